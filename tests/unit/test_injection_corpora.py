"""The screen's precision on real text: the PubMedQA abstracts (what a knowledge base holds) and
the CLINC150 utterances (what people ask an assistant, many of them orders: "tell me...", "from
now on...") must come through untouched.

Measured: no sentence removed out of the 4,852 sentences of the first 500 PubMedQA abstracts (nor
from their 500 conclusions and 500 questions), and none of the 18,200 CLINC150 utterances."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.injection import _split, instruction_kind, screen_text

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
PUBMEDQA = DATA / "pubmedqa" / "train_dev.json"
CLINC150 = DATA / "clinc150" / "train_val.json"


def flagged(texts: list[str]) -> list[tuple[str, str | None]]:
    """The texts the screen changes, each with the kind of its first removed sentence."""
    found: list[tuple[str, str | None]] = []
    for text in texts:
        if screen_text(text).count:
            kinds = [instruction_kind(sentence) for sentence, _ in _split(text)]
            found.append((text[:200], next((kind for kind in kinds if kind), "role_marker")))
    return found


@pytest.fixture(scope="module")
def pubmedqa() -> list[dict[str, Any]]:
    items: dict[str, dict[str, Any]] = json.loads(PUBMEDQA.read_text())
    return list(items.values())[:500]


def test_no_sentence_of_the_pubmedqa_abstracts_is_removed(pubmedqa: list[dict[str, Any]]) -> None:
    assert len(pubmedqa) == 500
    abstracts = [" ".join(item["CONTEXTS"]) for item in pubmedqa]
    # As ingested (one text), line by line, and the conclusions and questions.
    texts = [
        *abstracts,
        *("\n".join(item["CONTEXTS"]) for item in pubmedqa),
        *(str(item["LONG_ANSWER"]) for item in pubmedqa),
        *(str(item["QUESTION"]) for item in pubmedqa),
    ]
    sentences = sum(len(_split(abstract)) for abstract in abstracts)
    assert sentences == 4852  # the measure is over thousands of sentences, not a handful
    assert flagged(texts) == []


def test_no_clinc150_utterance_is_removed() -> None:
    splits: dict[str, list[list[str]]] = json.loads(CLINC150.read_text())
    utterances = [text for rows in splits.values() for text, _ in rows]
    assert len(utterances) == 18_200
    assert flagged(utterances) == []
