"""The real service, started once per test session (about half a minute to two minutes)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.harness import MAX_MODEL_LEN, RunningService, ServiceError, running_service


@pytest.fixture(scope="session")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningService]:
    # Shutting down is part of the contract: leaving the block checks that SIGTERM stopped
    # the gateway and its whole engine, and fails the session otherwise.
    try:
        with running_service(
            tmp_path_factory.mktemp("data"), max_model_len=str(MAX_MODEL_LEN), engine_kv_cache_gib="2"
        ) as running:
            yield running
    except ServiceError as exc:
        pytest.fail(str(exc))
