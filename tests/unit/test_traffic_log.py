"""The traffic log: what a line keeps (prompts redacted, the decision and its scores), rotation,
reading back (and refusing what is not a traffic log), and ``traffic export``'s two forms,
checked against the readers of ``router fit`` and ``adapters train``."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from adapters.training_data import TrainingDataError, read_examples
from service import request_context
from service.cli import main
from service.cli_router import _read_examples
from service.cli_traffic import export_rows, probability, since
from service.protocol import RagRoute, RouteDecision, RouteSource
from service.redaction import EMAIL, NUMBER, REDACTED, redact_prompt
from service.traffic_log import (
    MAX_PROMPT_CHARS,
    Observed,
    Retrieved,
    RouterView,
    TrafficLine,
    TrafficLog,
    TrafficLogError,
    read_log,
    rotated,
)

SCORES = {"banking": 0.9, "cooking": 0.04, "base": 0.06}
PERSONAL = "I am jane.doe@example.com, call me on +44 20 7946 0958 about card 4111 1111 1111 1111"


def decision(adapter: str | None = "banking", *, used: tuple[str, ...] = ()) -> RouteDecision:
    sources = [
        RouteSource(
            id=i + 1, source="s.md", score=0.6, text="t", collection="rates", chunk_id=chunk, volatile=True
        )
        for i, chunk in enumerate(used)
    ]
    return RouteDecision(adapter=adapter, rag=RagRoute(used=bool(sources), sources=sources), reason="r")


def observed(
    query: str = "Transfer 200 dollars", *, pinned: bool = False, scores: Mapping[str, float] = SCORES
) -> Observed:
    retrieved = [Retrieved("rates", "c1", 0.61), Retrieved("handbook", "c2", 0.31)]
    return Observed.of(query, pinned, scores, retrieved, 3, lambda name: 0.5)


def written(path: Path, *records: tuple[Observed, RouteDecision]) -> list[TrafficLine]:
    log = TrafficLog(path, max_bytes=1 << 20, clock=lambda: 1_700_000_000.0)
    for seen, route in records:
        log.record(seen, route.adapter, route)
    log.close()
    return list(read_log(path))


def line(
    prompt: str, adapter: str | None, *, pinned: bool = False, confidence: float | None = 0.9
) -> TrafficLine:
    router = None
    if confidence is not None:
        decided = adapter or "base"
        router = RouterView(
            version=1, decided=decided, confidence=confidence, scores={decided: confidence},
            best_adapter=adapter, threshold=0.5, abstained=False,
        )  # fmt: skip
    return TrafficLine(
        time=datetime(2026, 12, 6, tzinfo=UTC), request_id=None, prompt=prompt, pinned=pinned,
        adapter=adapter, rag=False, router=router, retrieval=[],
    )  # fmt: skip


# ---------------------------------------------------------------------------- redaction


def test_prompts_lose_addresses_numbers_and_secrets() -> None:
    assert redact_prompt(PERSONAL) == f"I am {EMAIL}, call me on {NUMBER} about card {NUMBER}"
    assert redact_prompt("Call (415) 555-0134 or 555 0134 567") == f"Call {NUMBER} or {NUMBER}"
    assert redact_prompt("my password is hunter22, token sk-live-9f8e7d6c5b4a") == (
        f"my password is {REDACTED}, token {REDACTED}"
    )


def test_ordinary_prompts_are_left_alone() -> None:
    for text in (
        "Transfer 200 dollars to checking on 2026-12-05",
        "What is 3.14159 times 12?",
        "Is 1,000,000 a lot? Version 2.4.1 of the app",
        "How long should I boil an egg?",
    ):
        assert redact_prompt(text) == text


# ---------------------------------------------------------------------------- writing


def test_a_line_holds_the_redacted_prompt_the_route_and_the_scores(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "traffic.jsonl"
    scope = request_context.RequestScope(request_id="req-42", started=time.perf_counter())
    token = request_context.bind(scope)
    try:
        (entry,) = written(path, (observed(PERSONAL), decision(used=("c1",))))
    finally:
        request_context.unbind(token)
    assert entry.request_id == "req-42"
    assert entry.time == datetime.fromtimestamp(1_700_000_000, UTC)
    for personal in ("jane", "7946", "4111"):
        assert personal not in entry.prompt
    assert entry.prompt.startswith(f"I am {EMAIL}")
    assert (entry.pinned, entry.adapter, entry.rag) == (False, "banking", True)
    assert entry.router == RouterView(
        version=3, decided="banking", confidence=0.9, scores=SCORES,
        best_adapter="banking", threshold=0.5, abstained=False,
    )  # fmt: skip
    assert [(p.collection, p.score, p.used) for p in entry.retrieval] == [
        ("rates", 0.61, True),
        ("handbook", 0.31, False),
    ]
    # Nothing of the raw prompt reached the disk.
    assert "jane.doe" not in path.read_text()


def test_an_abstention_and_a_pinned_request(tmp_path: Path) -> None:
    unsure = {"banking": 0.45, "cooking": 0.05, "base": 0.5}
    abstained, pinned = written(
        tmp_path / "t.jsonl",
        (observed("Hello", scores=unsure), decision(None)),
        (observed("Boil an egg", pinned=True), decision("cooking")),
    )
    assert abstained.router is not None
    assert (abstained.router.decided, abstained.router.confidence, abstained.router.abstained) == (
        "base",
        0.5,
        True,
    )
    # Pinned: the adapter the client named answered; the router's view says what it would have chosen.
    assert (pinned.pinned, pinned.adapter) == (True, "cooking")
    assert pinned.router is not None
    assert pinned.router.decided == "banking"


def test_a_decision_without_a_classifier_has_no_router_view(tmp_path: Path) -> None:
    (entry,) = written(tmp_path / "t.jsonl", (Observed("Hi", pinned=False), decision(None)))
    assert entry.router is None
    assert entry.retrieval == []


def test_long_prompts_are_cut_to_what_router_fit_takes(tmp_path: Path) -> None:
    (entry,) = written(tmp_path / "t.jsonl", (observed("word " * 2000), decision()))
    assert len(entry.prompt) == MAX_PROMPT_CHARS


def test_the_log_rotates_at_max_bytes_and_reads_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    log = TrafficLog(path, max_bytes=4096)
    for i in range(30):
        log.record(observed(f"question number {i}"), "banking", decision())
    log.close()
    assert rotated(path).exists()
    assert max(path.stat().st_size, rotated(path).stat().st_size) <= 4096
    prompts = [entry.prompt for entry in read_log(path)]
    assert prompts == [f"question number {i}" for i in range(30 - len(prompts), 30)]
    assert len(prompts) > 10


def test_records_after_close_are_ignored_and_a_reopened_log_appends(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    written(path, (observed("first"), decision()))
    log = TrafficLog(path, max_bytes=1 << 20)
    log.record(observed("second"), "banking", decision())
    log.close()
    log.record(observed("third"), "banking", decision())
    assert [entry.prompt for entry in read_log(path)] == ["first", "second"]


# ---------------------------------------------------------------------------- reading


def test_reading_refuses_what_is_not_a_traffic_log(tmp_path: Path) -> None:
    with pytest.raises(TrafficLogError, match="no such file"):
        list(read_log(tmp_path / "missing.jsonl"))
    path = tmp_path / "t.jsonl"
    written(path, (observed(), decision()))
    with path.open("a") as file:
        file.write('{"text": "hello", "label": "base"}\n')
    with pytest.raises(TrafficLogError, match=r"t\.jsonl:2: not a traffic log line \(time: Field required\)"):
        list(read_log(path))


def test_a_last_line_cut_short_by_a_crash_is_skipped(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    written(path, (observed(), decision()))
    with path.open("a") as file:
        file.write('{"v": 1, "time": "2026-12-06T00:00:00Z", "req')
    assert len(list(read_log(path))) == 1


def test_since_keeps_the_recent_lines(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    written(path, (observed(), decision()))  # logged at 2023-11-14 (the fixed clock)
    assert list(read_log(path, since=datetime(2024, 1, 1, tzinfo=UTC))) == []
    assert len(list(read_log(path, since=datetime(2023, 1, 1, tzinfo=UTC)))) == 1


# ---------------------------------------------------------------------------- export


def test_the_fit_form_is_what_router_fit_reads(tmp_path: Path) -> None:
    exported = export_rows(
        [
            line("Transfer 200 dollars", "banking"),
            line("Boil an egg", "cooking", pinned=True, confidence=None),
            line("Hello there", None),
        ]
    )
    assert exported.rows == [
        {"text": "Transfer 200 dollars", "label": "banking"},
        {"text": "Boil an egg", "label": "cooking"},
        {"text": "Hello there", "label": "base"},
    ]
    out = tmp_path / "fit.jsonl"
    out.write_text("".join(json.dumps(row) + "\n" for row in exported.rows))
    assert _read_examples(out) == [
        ("Transfer 200 dollars", "banking"),
        ("Boil an egg", "cooking"),
        ("Hello there", "base"),
    ]


def test_the_train_form_needs_answers_before_adapters_train_takes_it(tmp_path: Path) -> None:
    exported = export_rows([line("Transfer 200 dollars", "banking")], form="train", adapter="banking")
    assert exported.rows == [
        {"messages": [{"role": "user", "content": "Transfer 200 dollars"}], "label": "banking"}
    ]
    out = tmp_path / "train.jsonl"
    out.write_text(json.dumps(exported.rows[0]) + "\n")
    with pytest.raises(TrainingDataError, match="the last message must be the assistant's answer"):
        read_examples(out)
    answered = {
        **exported.rows[0],
        "messages": [*exported.rows[0]["messages"], {"role": "assistant", "content": "Done."}],
    }
    out.write_text(json.dumps(answered) + "\n")
    (example,) = read_examples(out)
    assert example is not None
    assert example.answer == "Done."


def test_export_filters_and_what_it_leaves_out() -> None:
    lines = [
        line("Transfer 200 dollars", "banking", confidence=0.95),
        line("Transfer 200 dollars", "banking", confidence=0.95),  # a repeat
        line("Maybe banking?", "banking", confidence=0.55),
        line("Ambiguous", "banking"),
        line("Ambiguous", "cooking"),  # the same prompt, another label: which is right?
        line("Not scored", None, confidence=None),  # no classifier: the base model by default
        line("Named", "cooking", pinned=True, confidence=0.1),
        line("   ", None),
    ]
    exported = export_rows(lines, min_confidence=0.9)
    assert exported.rows == [
        {"text": "Transfer 200 dollars", "label": "banking"},
        {"text": "Named", "label": "cooking"},
    ]
    assert dict(exported.skipped) == {
        "duplicate": 1,
        "below confidence": 1,
        "conflicting": 2,
        "unscored": 1,
        "empty": 1,
    }
    assert [row["text"] for row in export_rows(lines, auto_only=True, adapter="cooking").rows] == []
    assert [row["text"] for row in export_rows(lines, adapter="cooking").rows] == ["Named"]


def test_the_command_writes_the_export(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log = tmp_path / "t.jsonl"
    written(log, (observed(PERSONAL), decision()), (observed("Hello", pinned=True), decision(None)))
    out = tmp_path / "out.jsonl"
    assert main(["traffic", "export", "--log", str(log), "--out", str(out)]) == 0
    rows = [json.loads(row) for row in out.read_text().splitlines()]
    assert [row["label"] for row in rows] == ["banking", "base"]
    assert "jane" not in out.read_text()
    assert capsys.readouterr().out.startswith(f"wrote 2 rows to {out} (banking 1, base 1)")


def test_bad_command_input_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = str(tmp_path / "out.jsonl")
    with pytest.raises(SystemExit, match="no such file"):
        main(["traffic", "export", "--log", str(tmp_path / "missing.jsonl"), "--out", out])
    with pytest.raises(SystemExit) as exited:
        main(["traffic", "export", "--log", "x", "--out", out, "--min-confidence", "1.5"])
    assert exited.value.code == 2
    assert "--min-confidence: 1.5 is not between 0 and 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exited:
        main(["router", "drift", "--log", "x", "--since", "yesterday"])
    assert exited.value.code == 2
    assert "'yesterday' is not a duration (30m, 24h, 7d) or an ISO date" in capsys.readouterr().err


def test_argument_types() -> None:
    assert probability("0.8") == 0.8
    with pytest.raises(argparse.ArgumentTypeError):
        probability("high")
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    assert since("24h", now) == now - timedelta(hours=24)
    assert since("7d", now) == now - timedelta(days=7)
    assert since("2026-12-01") == datetime(2026, 12, 1, tzinfo=UTC)
    assert since("2026-12-01T10:00:00+01:00") == datetime(2026, 12, 1, 9, tzinfo=UTC)
