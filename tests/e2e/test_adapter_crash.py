"""A gateway killed with SIGKILL in the middle of registrations: after a restart on the same
data directory, every acknowledged adapter is there and servable, nothing half-written is
visible, and the engine died with the gateway (no orphan)."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_adapters import answer, upload
from tests.harness import ADMIN_TOKEN, running_service

pytestmark = pytest.mark.e2e

WORKERS = 4
KILL_AFTER = 6


def test_kill_9_during_registrations_loses_nothing_acknowledged(
    tmp_path_factory: pytest.TempPathFactory, lora_adapter: Path
) -> None:
    data_dir = tmp_path_factory.mktemp("crash")
    started: list[str] = []
    acknowledged: list[str] = []
    enough = threading.Event()

    with running_service(data_dir, admin_token=ADMIN_TOKEN, max_model_len="1024") as service:

        def keep_registering(worker: int) -> None:
            # Registrations one after another until the gateway dies under one of them.
            with service.admin() as admin:
                for i in range(1000):
                    name = f"crash-{worker}-{i}"
                    started.append(name)
                    try:
                        response = upload(admin, name, lora_adapter)
                    except httpx.HTTPError:
                        return  # the gateway died under this request: not acknowledged
                    if response.status_code == 201:
                        acknowledged.append(name)
                    if len(acknowledged) >= KILL_AFTER:
                        enough.set()

        workers = [threading.Thread(target=keep_registering, args=(w,)) for w in range(WORKERS)]
        for worker in workers:
            worker.start()
        assert enough.wait(timeout=120), "registrations did not go through"
        service.process.send_signal(signal.SIGKILL)
        for worker in workers:
            worker.join(timeout=60)
        # Leaving the block checks that the engine died with its gateway (parent-death signal).

    in_flight = set(started) - set(acknowledged)
    assert in_flight, "no registration was in flight when the gateway was killed: nothing tested"
    with running_service(data_dir, admin_token=ADMIN_TOKEN, max_model_len="1024") as restarted:
        with restarted.admin() as admin:
            records = {r["name"]: r for r in admin.get("/admin/adapters").json()["data"]}
        assert set(acknowledged) <= set(records)
        # What was in flight is either wholly there or not there at all.
        assert set(records) <= set(started)
        assert all(record["rank"] == 8 for record in records.values())
        served = {model.id for model in restarted.client().models.list()}
        assert set(records) <= served
        assert answer(restarted, acknowledged[0])
