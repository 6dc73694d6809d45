"""A gateway killed with SIGKILL in the middle of registrations: after a restart on the same
data directory, every acknowledged adapter is there and servable, nothing half-written is
visible, and the engine died with the gateway (no orphan)."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_adapters import answer, upload
from tests.harness import ADMIN_TOKEN, running_service

pytestmark = pytest.mark.e2e

REGISTRATIONS = 12


def test_kill_9_during_registrations_loses_nothing_acknowledged(
    tmp_path_factory: pytest.TempPathFactory, lora_adapter: Path
) -> None:
    data_dir = tmp_path_factory.mktemp("crash")
    acknowledged: list[str] = []
    first_done = threading.Event()

    with running_service(data_dir, admin_token=ADMIN_TOKEN, max_model_len="1024") as service:

        def register(index: int) -> None:
            name = f"crash-{index}"
            try:
                with service.admin() as admin:
                    if upload(admin, name, lora_adapter).status_code == 201:
                        acknowledged.append(name)
                        first_done.set()
            except httpx.HTTPError:
                pass  # the gateway died under this request: not acknowledged

        workers = [threading.Thread(target=register, args=(i,)) for i in range(REGISTRATIONS)]
        for worker in workers:
            worker.start()
            time.sleep(0.05)
        assert first_done.wait(timeout=120), "no registration finished"
        service.process.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.join(timeout=60)
        # Leaving the block checks that the engine died with its gateway (parent-death signal).

    assert acknowledged, "at least one registration was acknowledged before the kill"
    assert len(acknowledged) < REGISTRATIONS, "the kill landed after every registration: nothing tested"
    with running_service(data_dir, admin_token=ADMIN_TOKEN, max_model_len="1024") as restarted:
        with restarted.admin() as admin:
            records = {r["name"]: r for r in admin.get("/admin/adapters").json()["data"]}
        assert set(acknowledged) <= set(records)
        for name in records:
            assert name.startswith("crash-")
            assert records[name]["rank"] == 8
        served = {model.id for model in restarted.client().models.list()}
        assert set(records) <= served
        assert answer(restarted, acknowledged[0])
