"""Routing observed: the score histograms on /metrics, the traffic log (one redacted line per
served chat request, none for an explained one, nothing at all when the setting is unset), and
``traffic export`` / ``router drift`` over what a real gateway logged and stored. Real adapters,
embedder and index; the engine is the scripted fake."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.cli import main
from service.drift_reference import load_reference
from service.route_fit import RoutingScore
from service.settings import Settings
from service.traffic_log import TrafficLine, read_log
from tests.api.admin_support import (  # noqa: F401 (fixtures, under their pytest names)
    AUTH,
    BASE_ID,
    admin_settings,
    base_dir_fixture,
    engine_fixture,
    import_dir_fixture,
    store_dir_fixture,
)
from tests.api.conftest import CHAT, chat_body
from tests.api.test_models_health_metrics import metric, scrape
from tests.api.test_router import EGG, RATE_QUESTION, SMALL_TALK, TRANSFER, adapters, handbook, rates
from tests.fakes import FakeEngine
from tests.vllm_bodies import stream_chunks

# The fixtures, imported under their pytest names.
assert adapters
assert handbook
assert rates

PERSONAL = "Please transfer 200 dollars to jane.doe@example.com and text me on +1 415 555 0134 when done."
EXPLAIN = "/admin/router/explain"


@pytest.fixture(name="settings")
def settings_fixture(
    request: pytest.FixtureRequest, base_dir: Path, import_dir: Path, tmp_path: Path
) -> Settings:
    """The admin tests' gateway with the traffic log on (parametrize with False for off)."""
    log = tmp_path / "logs" / "traffic.jsonl" if getattr(request, "param", True) else None
    return admin_settings(base_dir=base_dir, import_dir=import_dir, traffic_log=log)


async def served(client: httpx.AsyncClient, engine: FakeEngine, prompt: str, **fields: Any) -> httpx.Response:
    engine.enqueue_completion()
    response = await client.post(
        CHAT, json=chat_body(messages=[{"role": "user", "content": prompt}], **fields)
    )
    assert response.status_code == 200, response.text
    return response


async def logged(path: Path, count: int) -> list[TrafficLine]:
    """The log's lines once it holds ``count`` (the writer thread is a few ms behind)."""
    deadline = time.monotonic() + 10
    while True:
        lines = await asyncio.to_thread(_read, path)
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        await asyncio.sleep(0.02)


def _read(path: Path) -> list[TrafficLine]:
    return list(read_log(path)) if path.exists() else []


def _append(path: Path, text: str) -> None:
    with path.open("a") as file:
        file.write(text)


def _holding(root: Path, marker: bytes) -> list[Path]:
    """The files under ``root`` whose bytes contain ``marker``."""
    return [path for path in root.rglob("*") if path.is_file() and marker in path.read_bytes()]


# ---------------------------------------------------------------------------- /metrics


async def test_served_decisions_fill_the_score_histograms(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    settings: Settings,
    adapters: None,
    rates: None,
    handbook: None,
) -> None:
    routes = [(await served(client, engine, prompt)).json()["route"] for prompt in (TRANSFER, SMALL_TALK)]
    assert [route["adapter"] for route in routes] == ["banking", None]
    text = await scrape(client)
    # The probability of the class decided, under the adapter decided ('' for the base model).
    assert metric(text, "hybrid_route_score_count", adapter="banking") == 1
    assert metric(text, "hybrid_route_score_sum", adapter="banking") == pytest.approx(
        routes[0]["scores"]["adapters"]["banking"], abs=1e-4
    )
    assert metric(text, "hybrid_route_score_count", adapter="") == 1
    assert metric(text, "hybrid_route_score_sum", adapter="") == pytest.approx(
        routes[1]["scores"]["base"], abs=1e-4
    )
    confident = routes[0]["scores"]["adapters"]["banking"]
    assert metric(text, "hybrid_route_score_bucket", adapter="banking", le="0.9") == (
        0 if confident > 0.9 else 1
    )
    assert metric(text, "hybrid_route_score_bucket", adapter="banking", le="+Inf") == 1

    # Every passage returned, used or not, under its collection; and the best one per query.
    lines = await logged(settings.traffic_log or Path(), 2)
    for collection in ("rates", "handbook"):
        returned = [p.score for line in lines for p in line.retrieval if p.collection == collection]
        assert returned, f"{collection} returned nothing"
        assert metric(text, "hybrid_retrieval_score_count", collection=collection) == len(returned)
        assert metric(text, "hybrid_retrieval_score_sum", collection=collection) == pytest.approx(
            sum(returned), abs=1e-3
        )
    tops = sum(metric(text, "hybrid_retrieval_top_score_count", collection=c) for c in ("rates", "handbook"))
    assert tops == 2

    # An explained request is not served: nothing observed. A pinned one is not a routing
    # decision (no route score) but its retrieval is measured.
    assert (await client.post(EXPLAIN, json=chat_body(), headers=AUTH)).status_code == 200
    await served(client, engine, RATE_QUESTION, model="cooking")
    after = await scrape(client)
    total = sum(metric(after, "hybrid_route_score_count", adapter=a) for a in ("banking", "cooking", ""))
    assert total == 2
    tops = sum(metric(after, "hybrid_retrieval_top_score_count", collection=c) for c in ("rates", "handbook"))
    assert tops == 3


# ---------------------------------------------------------------------------- the log


async def test_each_served_request_gets_one_redacted_line(
    app: FastAPI,
    client: httpx.AsyncClient,
    engine: FakeEngine,
    settings: Settings,
    adapters: None,
    rates: None,
) -> None:
    auto = await served(client, engine, PERSONAL)
    engine.enqueue_stream(stream_chunks("Boil", " it."))
    async with client.stream(
        "POST", CHAT, json=chat_body(messages=[{"role": "user", "content": EGG}], stream=True)
    ) as streamed:
        assert streamed.status_code == 200
        await streamed.aread()
    pinned = await served(client, engine, SMALL_TALK, model="cooking")
    assert (await client.post(EXPLAIN, json=chat_body(), headers=AUTH)).status_code == 200

    assert settings.traffic_log is not None
    lines = await logged(settings.traffic_log, 3)
    await asyncio.sleep(0.2)  # and no fourth, for the explained request
    assert await asyncio.to_thread(_read, settings.traffic_log) == lines
    assert [line.request_id for line in lines] == [
        response.headers["x-request-id"] for response in (auto, streamed, pinned)
    ]
    first, stream_line, pinned_line = lines
    assert first.prompt == "Please transfer 200 dollars to [email] and text me on [number] when done."
    assert await asyncio.to_thread(_holding, settings.traffic_log.parent, b"jane.doe") == []
    assert await asyncio.to_thread(_holding, settings.traffic_log.parent, b"555 0134") == []

    version = app.state.router.learner.active.version
    for line, adapter in ((first, "banking"), (stream_line, "cooking")):
        assert (line.pinned, line.adapter) == (False, adapter)
        assert line.router is not None
        assert line.router.version == version
        assert line.router.decided == adapter
        assert set(line.router.scores) == {"banking", "cooking", "base"}
        assert sum(line.router.scores.values()) == pytest.approx(1, abs=1e-3)
        assert line.router.confidence == line.router.scores[adapter]
        assert line.router.threshold == app.state.router.learner.active.model.abstain
        assert not line.router.abstained
        assert [p.collection for p in line.retrieval] == ["rates"]
    assert (pinned_line.pinned, pinned_line.adapter) == (True, "cooking")
    assert pinned_line.router is not None
    assert pinned_line.router.decided == "base"  # what the classifier would have chosen
    assert pinned_line.prompt == SMALL_TALK


@pytest.mark.parametrize("settings", [False], indirect=True)
async def test_nothing_is_logged_when_the_setting_is_unset(
    client: httpx.AsyncClient, engine: FakeEngine, tmp_path: Path
) -> None:
    marker = "Zebra-quartz-marmalade: what should I name my boat?"
    await served(client, engine, marker)
    await asyncio.sleep(0.2)
    assert await asyncio.to_thread(_holding, tmp_path, b"marmalade") == []
    assert metric(await scrape(client), "hybrid_traffic_log_dropped_total") == 0


# ---------------------------------------------------------------------------- reading it back


async def test_the_reference_is_the_fit_scored_out_of_fold(
    app: FastAPI, adapters: None, tmp_path: Path
) -> None:
    """``router drift``'s fit-time side rebuilds the stored version's rows and out-of-fold
    predictions: the same figures as the fit's own validation."""
    active = app.state.router.learner.active
    reference = await asyncio.to_thread(load_reference, tmp_path / "adapters", app.state.knowledge.embedder)
    assert (reference.version, reference.exact) == (active.version, True)
    assert reference.classes == active.model.classes
    score = RoutingScore.of(reference.truth, reference.routed.decided)
    validation = active.meta["validation"]
    assert round(score.in_domain_accuracy, 4) == validation["in_domain_accuracy"]
    assert round(score.base_recall, 4) == validation["base_recall"]
    assert len(reference.truth) == validation["rows"]
    assert sum(active.meta["data"]["base"].values()) / reference.rows == pytest.approx(
        reference.fit_share["base"]
    )


async def test_export_and_drift_over_the_gateways_log(
    client: httpx.AsyncClient,
    engine: FakeEngine,
    settings: Settings,
    adapters: None,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for prompt in (TRANSFER, EGG, SMALL_TALK, PERSONAL):
        await served(client, engine, prompt)
    assert settings.traffic_log is not None
    log = str(settings.traffic_log)
    assert len(await logged(settings.traffic_log, 4)) == 4

    out = tmp_path / "labelled.jsonl"
    assert main(["traffic", "export", "--log", log, "--out", str(out), "--min-confidence", "0.5"]) == 0
    rows = [json.loads(row) for row in out.read_text().splitlines()]
    assert {(row["text"], row["label"]) for row in rows} >= {(TRANSFER, "banking"), (EGG, "cooking")}
    capsys.readouterr()

    monkeypatch.setenv("HYBRID_DATA_DIR", str(tmp_path))
    monkeypatch.delenv("HYBRID_ADAPTER_DIR", raising=False)
    drift_args = ["router", "drift", "--log", log, "--min-samples", "1"]
    assert await asyncio.to_thread(main, [*drift_args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["traffic"]["compared"] == 4
    assert report["router"]["exact"] is True
    classes = {row["name"]: row for row in report["classes"]}
    assert set(classes) == {"banking", "cooking", "base"}
    assert classes["banking"]["recent"] >= 1
    assert classes["cooking"]["recent"] == 1
    assert sum(row["recent_share"] for row in classes.values()) == pytest.approx(1)
    assert classes["cooking"]["cosine_recent"] is not None
    assert set(report["drifted"]) <= set(classes)

    # The table names every class and says what drifted.
    assert await asyncio.to_thread(main, drift_args) == 0
    table = capsys.readouterr().out
    assert "against 4 automatic requests" in table
    assert "drifted" in table

    # Bad input: a clear message, no traceback.
    with pytest.raises(SystemExit, match="nothing to export"):
        main(["traffic", "export", "--log", log, "--out", str(out), "--adapter", "gardening"])
    with pytest.raises(SystemExit, match=r"router drift: .*000099 is missing"):
        main([*drift_args, "--version", "99"])
    await asyncio.to_thread(_append, Path(log), "not json\n")
    with pytest.raises(SystemExit, match=r"traffic\.jsonl:5: not a traffic log line"):
        main(drift_args)
