"""``router eval`` on a tiny CLINC150-shaped data set with the real embedder: the report's shape,
the learned router on separable domains, the confusion matrices, and no held-out text in any
fit row."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from index.embedder import Embedder, load_embedder
from service.route_fit import BASE
from service.router_eval import DOMAINS, LABELS, SWEEP, evaluate, load_clinc, prepare
from service.router_eval_plot import plot, table

PHRASES = {
    "banking": {
        "transfer": ["transfer money to my savings account", "move cash between my bank accounts"],
        "balance": ["what is my bank account balance", "how much money is in my checking account"],
    },
    "credit_cards": {
        "card_declined": ["my credit card was declined at the store", "why did my visa card get rejected"],
        "credit_limit": ["what is my credit card limit", "raise the spending limit on my mastercard"],
    },
    "travel": {
        "book_flight": ["book a flight to paris", "find me plane tickets to tokyo"],
        "travel_visa": ["do i need a visa to visit japan", "passport rules for a trip to brazil"],
    },
    "auto_and_commute": {
        "oil_change": ["when is my car due for an oil change", "schedule an oil change for my truck"],
        "tire_pressure": ["check the tire pressure on my car", "what psi should my car tires be"],
    },
    "kitchen_and_dining": {
        "recipe": ["give me a recipe for lasagna", "how do i cook chicken curry"],
        "restaurant_reservation": [
            "reserve a table at an italian restaurant",
            "book dinner at the steakhouse",
        ],
    },
    "home": {
        "shopping_list": ["add milk to my shopping list", "put eggs on the grocery list"],
        "play_music": ["play some jazz music", "put on my favourite rock playlist"],
    },
    "utility": {
        "weather": ["what is the weather forecast for tomorrow", "will it rain this afternoon"],
        "timer": ["set a timer for ten minutes", "start a countdown of five minutes"],
    },
    "work": {
        "pto_request": [
            "submit a paid time off request at work",
            "how many vacation days do i have left at work",
        ],
        "meeting_schedule": [
            "schedule a meeting with my manager",
            "book a conference room for the team meeting",
        ],
    },
    "small_talk": {
        "greeting": ["hello there, how are you doing", "good morning, nice to meet you"],
        "tell_joke": ["tell me a funny joke", "do you know any good jokes"],
    },
    "meta": {
        "change_volume": ["turn up your volume", "lower your voice"],
        "what_is_your_name": ["what should i call you", "do you have a name"],
    },
}
PREFIXES = ["", "please, ", "can you tell me: ", "hey, ", "i was wondering, ", "quick question: "]
OOS_TRAIN = ["how many moons does jupiter have", "who wrote the odyssey", "what is the capital of mongolia"]
OOS_VAL = ["how tall is mount everest", "what causes earthquakes", "who painted the mona lisa"]
LEAKED = "quick question: book a flight to paris"
"""A held-out query that also occurs in train: it must not be fitted on."""


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


@pytest.fixture(scope="module")
def clinc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clinc150")
    domains = {domain: list(intents) for domain, intents in PHRASES.items()}
    train: list[list[str]] = [[LEAKED, "book_flight"]]
    val: list[list[str]] = [["hi", "greeting"]]  # also a bundled general-chat prompt
    for intents in PHRASES.values():
        for intent, phrases in intents.items():
            texts = [prefix + phrase for phrase in phrases for prefix in PREFIXES]
            train += [[text, intent] for text in texts if not text.startswith(PREFIXES[-1])]
            val += [[text, intent] for text in texts if text.startswith(PREFIXES[-1])]
    rows = {
        "train": train,
        "val": val,
        "oos_train": [[text, "oos"] for text in OOS_TRAIN],
        "oos_val": [[text, "oos"] for text in OOS_VAL],
    }
    (folder / "domains.json").write_text(json.dumps(domains))
    (folder / "train_val.json").write_text(json.dumps(rows))
    return folder


@pytest.fixture(scope="module")
def report(clinc: Path, embedder: Embedder) -> dict[str, Any]:
    return evaluate(clinc, embedder, 0.45)


METHODS = {
    "out_of_the_box": {"classifier", "threshold_router"},
    "fitted": {"classifier", "threshold_router", "centroid_baseline"},
}


def test_the_report_holds_every_method_of_both_settings(report: dict[str, Any]) -> None:
    assert report["labels"] == [*DOMAINS, BASE]
    assert "never" in report["note"]
    assert report["held_out"]["base"] == {"meta": 4, "oos": 3, "small_talk": 5}
    assert {name: set(setting["methods"]) for name, setting in report["settings"].items()} == METHODS
    for setting in report["settings"].values():
        assert set(setting["targets_met"]) == {"in_domain_accuracy", "base_recall"}
        for result in setting["methods"].values():
            assert set(result["score"]) == {"in_domain_accuracy", "base_recall", "macro_f1", "queries"}
            assert set(result["base_recall_by_source"]) == {"small_talk", "meta", "oos"}
        classifier = setting["methods"]["classifier"]
        assert [point["abstain"] for point in classifier["abstain_sweep"]] == SWEEP
        assert SWEEP[0] == 0.05
        assert SWEEP[-1] == 0.95
        assert len(SWEEP) == 19
        assert 0 < classifier["abstain"] < 1
        assert classifier["temperature"] > 0
        assert classifier["validation"]["rows"] > 0
        assert 0 < classifier["decision_ms_median"] < 50
    fitted = report["settings"]["fitted"]
    assert fitted["sample"] == {
        "prompts_per_intent": 10,
        "seed": 0,
        "rows": 203,
        "intents": 20,
        "oos_train": 3,
    }
    assert set(fitted["methods"]["threshold_router"]["thresholds"]) <= set(DOMAINS)
    json.dumps(report)  # what router_eval.json holds


def test_the_learned_router_separates_distinct_domains(report: dict[str, Any]) -> None:
    for name in ("out_of_the_box", "fitted"):
        score = report["settings"][name]["methods"]["classifier"]["score"]
        assert score["in_domain_accuracy"] >= 0.9, name
    fitted = report["settings"]["fitted"]["methods"]["classifier"]["score"]
    assert fitted["base_recall"] >= 0.8


def test_confusion_rows_count_each_class(report: dict[str, Any], clinc: Path) -> None:
    _, held_out, _ = load_clinc(clinc)
    expected = Counter(held_out.labels)
    for setting in report["settings"].values():
        for result in setting["methods"].values():
            rows = [sum(row) for row in result["confusion"]]
            assert rows == [expected[label] for label in LABELS]
            assert result["score"]["queries"] == len(held_out.texts)


def test_no_held_out_text_is_fitted_on(clinc: Path, embedder: Embedder) -> None:
    material = prepare(clinc, embedder)
    held = set(material.held_out.texts)
    assert {LEAKED, "hi"} <= held
    fit_texts = {row.text for row in material.fitted} | set(material.sample.texts)
    fit_texts |= {text for adapter in material.adapters for text in adapter.examples}
    assert not held & fit_texts
    assert material.excluded == {"clinc_train": 1, "general": 1}
    assert {row.origin for row in material.fitted} == {"example", "description", "general", "fit"}
    per_intent = Counter(material.sample.intents)
    assert per_intent.pop("oos") == len(OOS_TRAIN)
    assert set(per_intent.values()) == {10}


def test_the_figure_and_the_table(report: dict[str, Any], tmp_path: Path) -> None:
    plot(report, tmp_path / "router_eval.png")
    assert (tmp_path / "router_eval.png").stat().st_size > 10_000
    printed = table(report)
    assert "centroid_baseline" in printed
    assert "targets" in printed
