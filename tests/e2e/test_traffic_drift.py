"""The traffic log end to end: real routed requests through a real gateway (real adapters in
the real engine, the real embedder and index) with ``HYBRID_TRAFFIC_LOG`` on, the score
histograms on /metrics, then ``traffic export`` on the log, ``router fit`` on the export, and
``router drift`` comparing the log with the version that fit stored.

The gateway is this test's own (attached to the session's engine), so that its adapters do not
change where other tests' ``auto`` requests go."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.bundled_model import HF_ID
from service.traffic_log import TrafficLine, read_log
from tests.api.test_router import BANKING, COOKING, EGG, SMALL_TALK, TRANSFER
from tests.e2e.test_adapters import upload
from tests.e2e.test_router import FACT, FERRY
from tests.harness import ADMIN_TOKEN, RunningService, running_service, wait_for_router

pytestmark = pytest.mark.e2e

PERSONAL = "Please transfer 200 dollars to jane.doe@example.com and text me on +1 415 555 0134."
ADAPTERS = ("drift-banking", "drift-cooking")


@pytest.fixture
def gateway(
    service: RunningService,
    tmp_path: Path,
    lora_adapter: Path,
    other_lora_adapter: Path,
    bundled_base_dir: Path,
) -> Iterator[RunningService]:
    """A gateway keeping a traffic log, with two adapters and one collection."""
    settings = {
        "admin_token": ADMIN_TOKEN,
        "base_model_dir": str(bundled_base_dir),
        "base_model_hf_id": HF_ID,
        "traffic_log": str(tmp_path / "traffic.jsonl"),
    }
    with running_service(tmp_path, engine_url=service.engine_url, **settings) as running:
        with running.admin() as admin:
            for name, adapter, examples in zip(
                ADAPTERS, (lora_adapter, other_lora_adapter), (BANKING, COOKING), strict=True
            ):
                response = upload(
                    admin, name, adapter, examples=examples, description=f"{name[6:]} questions"
                )
                assert response.status_code == 201, response.text
            ingested = admin.post(
                "/admin/collections/ferries/documents",
                json={"documents": [{"source": "ferries.txt", "text": FACT}]},
            )
            assert ingested.status_code == 200, ingested.text
            wait_for_router(admin, set(ADAPTERS))
        try:
            yield running
        finally:
            # The engine is shared with the rest of the session: leave it as it was.
            with running.admin() as admin:
                for name in ADAPTERS:
                    admin.delete(f"/admin/adapters/{name}")


def chat(gateway: RunningService, prompt: str, model: str = "auto") -> tuple[str, str | None]:
    """A real generation: its request id and the adapter that answered."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0,
        "max_tokens": 8,
    }
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    adapter: str | None = response.json()["route"]["adapter"]
    return response.headers["x-request-id"], adapter


def cli(gateway: RunningService, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HYBRID_GATEWAY_URL": gateway.url,
        "HYBRID_ADMIN_TOKEN": ADMIN_TOKEN,
        "HYBRID_DATA_DIR": str(gateway.data_dir),
    }
    env.pop("HYBRID_ADAPTER_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "service", *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{args}: {done.stderr}"
    return done


def logged(path: Path, count: int) -> list[TrafficLine]:
    deadline = time.monotonic() + 10
    while True:
        lines = list(read_log(path)) if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


def test_logged_traffic_is_exported_fitted_on_and_compared(gateway: RunningService, tmp_path: Path) -> None:
    sent = [
        (TRANSFER, "auto", "drift-banking"),
        (EGG, "auto", "drift-cooking"),
        (PERSONAL, "auto", "drift-banking"),
        (SMALL_TALK, "auto", None),
        (FERRY, "auto", None),
        (TRANSFER, "drift-cooking", "drift-cooking"),  # pinned
    ]
    ids = []
    for prompt, model, expected in sent:
        request_id, adapter = chat(gateway, prompt, model)
        assert adapter == expected, prompt
        ids.append(request_id)
    assert gateway.gateway_metric("hybrid_route_score_count", adapter="drift-banking") == 2
    assert gateway.gateway_metric("hybrid_route_score_count", adapter="") == 2
    assert gateway.gateway_metric("hybrid_retrieval_score_count", collection="ferries") == len(sent)

    # One line per request, in order, the prompt redacted.
    log = tmp_path / "traffic.jsonl"
    lines = logged(log, len(sent))
    assert [line.request_id for line in lines] == ids
    assert lines[2].prompt == "Please transfer 200 dollars to [email] and text me on [number]."
    assert "jane.doe" not in log.read_text()
    assert [line.adapter for line in lines] == [expected for _, _, expected in sent]
    assert [line.pinned for line in lines] == [False] * 5 + [True]
    ferry = lines[4]
    assert [(p.collection, p.used) for p in ferry.retrieval] == [("ferries", True)]

    # Exported for `router fit`, which takes it as it is.
    labelled = tmp_path / "labelled.jsonl"
    exported = cli(gateway, "traffic", "export", "--log", str(log), "--out", str(labelled))
    # TRANSFER went to two adapters (routed, then pinned): which label is right is not known.
    assert exported.stdout.startswith(f"wrote 4 rows to {labelled}")
    rows = [json.loads(row) for row in labelled.read_text().splitlines()]
    assert {(row["text"], row["label"]) for row in rows} == {
        (EGG, "drift-cooking"),
        ("Please transfer 200 dollars to [email] and text me on [number].", "drift-banking"),
        (SMALL_TALK, "base"),
        (FERRY, "base"),
    }
    with gateway.admin() as admin:
        before = admin.get("/admin/router").json()["classifier"]["version"]
    fitted = cli(gateway, "router", "fit", str(labelled))
    assert f"stored as version {before + 1}" in fitted.stdout

    # The log against the version just fitted: its rows rebuilt exactly, every class compared.
    drifted = cli(gateway, "router", "drift", "--log", str(log), "--json", "--min-samples", "1")
    report = json.loads(drifted.stdout)
    assert report["router"]["version"] == before + 1
    assert report["router"]["exact"] is True
    assert report["traffic"]["compared"] == 5
    assert report["traffic"]["pinned"] == 1
    classes = {row["name"]: row for row in report["classes"]}
    assert set(classes) == {*ADAPTERS, "base"}
    assert [classes[name]["recent"] for name in (*ADAPTERS, "base")] == [2, 1, 2]
    assert all(row["psi"] is not None for row in classes.values())
    assert set(report["drifted"]) == {row["name"] for row in classes.values() if row["psi"] > 0.2}
