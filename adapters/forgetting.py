"""Forgetting: whether an adapter damages what its base model could already do.

A LoRA trained on one task can make the model worse at everything else, and the held-out rows of
the task cannot show it. So the base and the adapter (the very same model with the adapter
switched off, as in :mod:`adapters.evaluation`) are also measured on a general set shipped with
the package, written for this project and unrelated to any adapter's data:

- ``data/general_text.txt``: 30 paragraphs of everyday English prose, cut into fixed windows of
  tokens (the same windows for both): perplexity per token. The plainest sign that the language
  model itself is damaged.
- ``data/general_chat.jsonl``: 60 general questions and instructions (facts, arithmetic, yes/no,
  rewriting, two short conversations), each with a reference answer in the ``messages`` and the
  short answer it must contain in ``expect``: the perplexity of the reference answers (as for the
  task's rows: the answer's tokens only), and an accuracy: how often the greedy answer contains
  the expected words. Containment rather than exact match, because the base answers in
  sentences ("The capital of France is Paris.") and is right to.

The adapter forgets when either perplexity rises by more than the margin's percentage of the
base's, or the accuracy falls by more than its points; registration then refuses it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

from adapters.chat_tokens import ChatEncoder, Encoded
from adapters.device import Placement
from adapters.evaluation import generate, mean_loss
from adapters.training_data import Example, Message, normalise

SHIPPED = "shipped"
CHAT_FILE = "general_chat.jsonl"
TEXT_FILE = "general_text.txt"
WINDOW = 256
"""Tokens per perplexity window of the general text: long enough for context to matter, short
enough that the text's 3,000 tokens make 12 windows."""
MAX_NEW_TOKENS = 16
"""The bundled base's one-sentence answers reach the expected words within 11 tokens, but for a few
rambling ones; generation is most of the measurement's time (a step costs the same for 12 rows as
for 60 on CPU)."""
GENERATION_BATCH = 64
"""Every chat prompt in one batch: the prompts are short (75 tokens at most)."""


@dataclass(frozen=True)
class ForgettingMargin:
    """How much worse than the base an adapter may be on the general set and still be registered."""

    text_perplexity_pct: float = 10.0
    """The largest accepted rise of the general text perplexity, in percent of the base's: damage
    to the language model itself, which no adapter should do."""
    chat_perplexity_pct: float = 10.0
    """The same for the general chat answers' perplexity."""
    accuracy_points: float = 10.0
    """The largest accepted fall of the general chat accuracy, in points (6 of the 60 rows). The
    two chat margins are the ones to widen for an adapter that, by design, answers every request
    in its task's format (a classifier reached through the router)."""

    def __post_init__(self) -> None:
        if min(self.text_perplexity_pct, self.chat_perplexity_pct, self.accuracy_points) < 0:
            raise ValueError("forgetting margins cannot be negative")

    def to_json(self) -> dict[str, float]:
        return {
            "text_perplexity_pct": self.text_perplexity_pct,
            "chat_perplexity_pct": self.chat_perplexity_pct,
            "accuracy_points": self.accuracy_points,
        }


@dataclass(frozen=True)
class GeneralSet:
    chat: tuple[Example, ...]
    expected: tuple[str, ...]
    """Normalised: the words each chat answer must contain."""
    text: str
    source: str = SHIPPED
    """Where it was read from: ``shipped``, or the directory given with ``--general-set``. Changes
    measured on different sets are not comparable, so the report names it."""

    def head(self, rows: int, text_chars: int) -> GeneralSet:
        """The first ``rows`` chat rows and ``text_chars`` characters of text: a cheaper measure
        (tests)."""
        return GeneralSet(self.chat[:rows], self.expected[:rows], self.text[:text_chars], self.source)


@cache
def general_set() -> GeneralSet:
    """The shipped general set (package data of ``adapters``)."""
    data = resources.files("adapters").joinpath("data")
    return _parse(
        data.joinpath(CHAT_FILE).read_text(encoding="utf-8"),
        data.joinpath(TEXT_FILE).read_text(encoding="utf-8"),
        SHIPPED,
    )


def read_general_set(directory: Path) -> GeneralSet:
    """A general set of one's own in the shipped layout: ``general_chat.jsonl`` and
    ``general_text.txt`` in ``directory``. Raises ValueError naming what is wrong."""
    texts = []
    for name in (CHAT_FILE, TEXT_FILE):
        path = directory / name
        if not path.is_file():
            raise ValueError(
                f"general set {directory}: no {name} (a general set holds {CHAT_FILE} and {TEXT_FILE})"
            )
        texts.append(path.read_text(encoding="utf-8"))
    return _parse(texts[0], texts[1], str(directory))


def _parse(chat_text: str, text: str, source: str) -> GeneralSet:
    chat: list[Example] = []
    expected: list[str] = []
    for number, line in enumerate(chat_text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"general set {source}, {CHAT_FILE} line {number}"
        try:
            row = json.loads(line)
            messages = tuple(Message(m["role"], m["content"]) for m in row["messages"])
            expect = normalise(row["expect"])
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f'{where}: expected {{"messages": [{{"role", "content"}}, ...], "expect": "..."}} ({error!r})'
            ) from None
        if not messages or messages[-1].role != "assistant" or not expect:
            raise ValueError(
                f"{where}: the last message must be the assistant's and expect must not be empty"
            )
        chat.append(Example(messages, number))
        expected.append(expect)
    if not chat or not text.strip():
        raise ValueError(f"general set {source}: {CHAT_FILE} and {TEXT_FILE} must not be empty")
    return GeneralSet(tuple(chat), tuple(expected), text, source)


def contains(answer: str, expected: str) -> bool:
    """Whether the normalised ``answer`` contains the (normalised) ``expected`` words as words."""
    return f" {expected} " in f" {normalise(answer)} "


def text_windows(tokenizer: Any, text: str, window: int = WINDOW) -> list[Encoded]:
    """The text's tokens in consecutive windows, every token labelled (its own next-token target)."""
    ids: list[int] = tokenizer(text)["input_ids"]
    chunks = [ids[start : start + window] for start in range(0, len(ids), window)]
    return [Encoded(chunk, chunk) for chunk in chunks if len(chunk) > 1]


@dataclass(frozen=True)
class GeneralScores:
    text_loss: float
    chat_loss: float
    chat_correct: int
    chat_rows: int

    @property
    def text_perplexity(self) -> float:
        return math.exp(min(self.text_loss, 50.0))

    @property
    def chat_perplexity(self) -> float:
        return math.exp(min(self.chat_loss, 50.0))

    @property
    def chat_accuracy(self) -> float:
        return self.chat_correct / max(self.chat_rows, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "text_loss": round(self.text_loss, 4),
            "text_perplexity": round(self.text_perplexity, 3),
            "chat_loss": round(self.chat_loss, 4),
            "chat_perplexity": round(self.chat_perplexity, 3),
            "chat_accuracy": round(self.chat_accuracy, 4),
            "chat_correct": self.chat_correct,
        }


def _relative_pct(adapter: float, base: float) -> float:
    return 100 * (adapter - base) / base


@dataclass(frozen=True)
class Forgetting:
    """The base and the adapter on the general set, and whether the adapter falls beyond the margin."""

    base: GeneralScores
    adapter: GeneralScores
    margin: ForgettingMargin
    text_tokens: int
    seconds: float
    source: str = SHIPPED

    @property
    def text_perplexity_change_pct(self) -> float:
        return _relative_pct(self.adapter.text_perplexity, self.base.text_perplexity)

    @property
    def chat_perplexity_change_pct(self) -> float:
        return _relative_pct(self.adapter.chat_perplexity, self.base.chat_perplexity)

    @property
    def chat_accuracy_change_points(self) -> float:
        return 100 * (self.adapter.chat_accuracy - self.base.chat_accuracy)

    @property
    def reasons(self) -> list[str]:
        """What fell beyond the margin, in words; empty when nothing did."""
        margin, found = self.margin, []
        for what, change, allowed in (
            ("general text perplexity", self.text_perplexity_change_pct, margin.text_perplexity_pct),
            ("general chat perplexity", self.chat_perplexity_change_pct, margin.chat_perplexity_pct),
        ):
            if change > allowed:
                found.append(f"{what} {change:+.1f}% (margin {allowed:g}%)")
        if -self.chat_accuracy_change_points > margin.accuracy_points:
            found.append(
                f"general chat accuracy {self.chat_accuracy_change_points:+.1f} points "
                f"(margin {margin.accuracy_points:g})"
            )
        return found

    @property
    def forgets(self) -> bool:
        return bool(self.reasons)

    def to_json(self) -> dict[str, Any]:
        return {
            "general_set": self.source,
            "chat_rows": self.base.chat_rows,
            "text_tokens": self.text_tokens,
            "base": self.base.to_json(),
            "adapter": self.adapter.to_json(),
            "change": {
                "text_perplexity_pct": round(self.text_perplexity_change_pct, 2),
                "chat_perplexity_pct": round(self.chat_perplexity_change_pct, 2),
                "chat_accuracy_points": round(self.chat_accuracy_change_points, 2),
            },
            "margin": self.margin.to_json(),
            "forgets": self.forgets,
            "reasons": self.reasons,
            "seconds": round(self.seconds, 1),
        }


def measure_forgetting(
    model: Any,
    encoder: ChatEncoder,
    *,
    placement: Placement,
    margin: ForgettingMargin,
    batch_size: int = 8,
    general: GeneralSet | None = None,
) -> Forgetting:
    """The general set (the shipped one unless given) scored with the adapter switched off (the
    base) and on; ``model`` a PEFT model."""
    started = time.monotonic()
    general = general or general_set()
    windows = text_windows(encoder.tokenizer, general.text)
    chat = [encoder.encode(e) for e in general.chat]
    prompts = [encoder.prompt_ids(e) for e in general.chat]

    def scores() -> GeneralScores:
        def loss(rows: list[Encoded]) -> float:
            return mean_loss(model, rows, pad_id=encoder.pad_id, batch_size=batch_size, placement=placement)

        answers = generate(
            model,
            encoder,
            prompts,
            max_new_tokens=MAX_NEW_TOKENS,
            batch_size=GENERATION_BATCH,
            placement=placement,
        )
        correct = sum(contains(a, e) for a, e in zip(answers, general.expected, strict=True))
        return GeneralScores(loss(windows), loss(chat), correct, len(chat))

    with model.disable_adapter():
        base = scores()
    adapter = scores()
    tokens = sum(len(w.input_ids) - 1 for w in windows)
    return Forgetting(base, adapter, margin, tokens, time.monotonic() - started, general.source)


def forgetting_verdict(forgetting: Forgetting) -> str:
    """One sentence for the report's verdict: the changes against the base, and whether they pass."""
    changes = (
        f"general text perplexity {forgetting.text_perplexity_change_pct:+.1f}%, general chat perplexity "
        f"{forgetting.chat_perplexity_change_pct:+.1f}%, general chat accuracy "
        f"{forgetting.chat_accuracy_change_points:+.1f} points"
    )
    if forgetting.forgets:
        return (
            f"It forgets what the base model could do: {changes}; beyond the margin: "
            f"{'; '.join(forgetting.reasons)}. Registration refuses it (--force overrides)."
        )
    margin = forgetting.margin
    return (
        f"On the general set: {changes} against the base, within the margins "
        f"({margin.text_perplexity_pct:g}%, {margin.chat_perplexity_pct:g}% and "
        f"{margin.accuracy_points:g} points)."
    )
