"""A real fine-tuning run on a tiny slice of CLINC150 banking, shared by the session: a few steps
of ``adapters train`` on the bundled model (about half a minute), for the unit and e2e tiers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapters.fine_tune import FineTuneResult, TrainRequest, fine_tune
from adapters.forgetting import CHAT_FILE, TEXT_FILE, GeneralSet, general_set
from adapters.train_config import TrainConfig
from service.bundled_model import HF_ID

CLINC = Path("../shared/data/clinc150")
INTENTS = ("freeze_account", "pin_change", "transfer", "report_fraud", "order_checks")
FEW_ROWS = 12
FEW_TEXT_CHARS = 2500
"""About two windows of the general text: the tests' cut of the general set, which keeps each
forgetting measurement to a few seconds (the whole set runs in the session's training fixture)."""
TINY = TrainConfig(epochs=1, learning_rate=2e-3, batch_size=8, eval_steps=2, patience=3, seed=0)


def banking_pairs(split: str, per_intent: int) -> list[dict[str, str]]:
    """``prompt``/``completion`` rows: a banking request and its intent's name."""
    rows = json.loads((CLINC / "train_val.json").read_text())[split]
    pairs: list[dict[str, str]] = []
    for intent in INTENTS:
        texts = [text for text, label in rows if label == intent][:per_intent]
        pairs.extend({"prompt": text, "completion": intent} for text in texts)
    return pairs


def write_jsonl(path: Path, rows: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def few_general() -> GeneralSet:
    return general_set().head(FEW_ROWS, FEW_TEXT_CHARS)


def write_general_set(directory: Path, general: GeneralSet) -> Path:
    """``general`` in the layout ``adapters train --general-set DIR`` reads."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [
        {"messages": [{"role": m.role, "content": m.content} for m in e.messages], "expect": expect}
        for e, expect in zip(general.chat, general.expected, strict=True)
    ]
    write_jsonl(directory / CHAT_FILE, rows)  # type: ignore[arg-type]
    (directory / TEXT_FILE).write_text(general.text, encoding="utf-8")
    return directory


def tiny_request(directory: Path, base_dir: Path, **overrides: object) -> TrainRequest:
    data = write_jsonl(directory / "banking.jsonl", banking_pairs("train", 12))
    fields: dict[str, object] = {
        "train_file": data,
        "name": "banking-tiny",
        "output": directory / "adapters",
        "base_model": base_dir,
        "base_model_id": HF_ID,
        "config": TINY,
        "max_rank": 16,
        "progress": False,
    }
    fields.update(overrides)
    return TrainRequest(**fields)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def trained_banking(tmp_path_factory: pytest.TempPathFactory, bundled_base_dir: Path) -> FineTuneResult:
    """60 rows (48 train, 12 validation), 6 steps: enough to learn the five intent names."""
    return fine_tune(tiny_request(tmp_path_factory.mktemp("train"), bundled_base_dir))
