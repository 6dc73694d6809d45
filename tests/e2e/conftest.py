"""The real service, started once per test session (about half a minute to two minutes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import ADMIN_TOKEN, MAX_MODEL_LEN, RunningService, ServiceError, running_service


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    # Shutting down is part of the contract: leaving the block checks that SIGTERM stopped
    # the gateway and its whole engine, and fails the session otherwise.
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "import").mkdir()
    try:
        with running_service(
            data_dir,
            max_model_len=str(MAX_MODEL_LEN),
            engine_kv_cache_gib="2",
            admin_token=ADMIN_TOKEN,
            adapter_import_dir=str(data_dir / "import"),
        ) as running:
            yield running
    except ServiceError as exc:
        pytest.fail(str(exc))
