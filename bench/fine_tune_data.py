"""The demonstration data sets for ``adapters train``, written as JSONL from ``../shared/data``.

- PubMedQA (PQA-L, 500 expert-labelled items): the question and its abstract, answered with one
  word, yes, no or maybe. Split 80/20 by the trainer. Two settings: the whole abstract, its
  conclusion (``LONG_ANSWER``) included, and PubMedQA's "reasoning-required" setting, where the
  conclusion is withheld and the answer must be inferred from the results.
- CLINC150 banking: a banking request answered with its intent's name, the 15 names listed in
  the system prompt so that the base model has every fact it needs, only not the habit.
  ``per_intent`` training rows per intent from CLINC's ``train`` split; the held-out file is
  CLINC's own ``val`` split.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any

SHARED = Path("../shared/data")
PUBMEDQA = SHARED / "pubmedqa" / "train_dev.json"
CLINC = SHARED / "clinc150"

PUBMEDQA_SYSTEM = (
    "You answer questions about biomedical research abstracts. Read the abstract, then answer "
    "the question with exactly one word: yes, no or maybe."
)
PUBMEDQA_CONCLUSION_SYSTEM = (
    "You answer questions about biomedical research from the conclusion of a study. Answer the "
    "question with exactly one word: yes if the conclusion supports it, no if it contradicts it, "
    "maybe if it is inconclusive."
)


def pubmedqa_conclusion_rows() -> list[dict[str, Any]]:
    """The question and the abstract's conclusion only (``LONG_ANSWER``): the part that carries
    the answer, in a fifth of the tokens, so that a small model trains for more epochs in the
    same time and its attention is not spread over the methods and results."""
    items = json.loads(PUBMEDQA.read_text())
    return [
        {
            "messages": [
                {"role": "system", "content": PUBMEDQA_CONCLUSION_SYSTEM},
                {
                    "role": "user",
                    "content": f"Conclusion: {item['LONG_ANSWER']}\n\nQuestion: {item['QUESTION']}",
                },
                {"role": "assistant", "content": item["final_decision"]},
            ]
        }
        for _, item in sorted(items.items())
    ]


def pubmedqa_rows(*, with_conclusion: bool) -> list[dict[str, Any]]:
    items = json.loads(PUBMEDQA.read_text())
    return [
        {
            "messages": [
                {"role": "system", "content": PUBMEDQA_SYSTEM},
                {"role": "user", "content": _question(item, with_conclusion)},
                {"role": "assistant", "content": item["final_decision"]},
            ]
        }
        for _, item in sorted(items.items())
    ]


def _question(item: dict[str, Any], with_conclusion: bool) -> str:
    sections = [*item["CONTEXTS"], item["LONG_ANSWER"]] if with_conclusion else item["CONTEXTS"]
    return f"Abstract: {' '.join(sections)}\n\nQuestion: {item['QUESTION']}"


def banking_intents() -> list[str]:
    intents: list[str] = json.loads((CLINC / "domains.json").read_text())["banking"]
    return intents


def clinc_banking_rows(split: str, per_intent: int | None, seed: int = 0) -> list[dict[str, Any]]:
    intents = banking_intents()
    system = (
        "Classify the customer's banking request. Answer with exactly one of these intent names "
        f"and nothing else: {', '.join(intents)}."
    )
    rows = [(text, intent) for text, intent in json.loads((CLINC / "train_val.json").read_text())[split]]
    chosen: list[tuple[str, str]] = []
    for intent in intents:
        of_intent = [r for r in rows if r[1] == intent]
        random.Random(f"{seed}-{intent}").shuffle(of_intent)
        chosen.extend(of_intent[:per_intent])
    return [
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": text},
                {"role": "assistant", "content": intent},
            ]
        }
        for text, intent in chosen
    ]


def write_jsonl(rows: Iterable[dict[str, Any]], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    """Write the demonstration files into ``bench/results/data`` (``make bench-train`` trains on them)."""
    out = Path("bench/results/data")
    write_jsonl(pubmedqa_rows(with_conclusion=True), out / "pubmedqa.jsonl")
    write_jsonl(pubmedqa_rows(with_conclusion=False), out / "pubmedqa_no_conclusion.jsonl")
    write_jsonl(pubmedqa_conclusion_rows(), out / "pubmedqa_conclusion.jsonl")
    write_jsonl(clinc_banking_rows("train", 40), out / "banking_train.jsonl")
    write_jsonl(clinc_banking_rows("val", 10), out / "banking_val.jsonl")
    print(
        f"wrote {out}/pubmedqa.jsonl, pubmedqa_no_conclusion.jsonl, pubmedqa_conclusion.jsonl, "
        "banking_*.jsonl"
    )


if __name__ == "__main__":
    main()
