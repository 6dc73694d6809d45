"""Training data for an adapter: read a JSONL file, curate it, split it.

Each line is a chat example, ``{"messages": [{"role", "content"}, ...]}`` with at least one
assistant turn, or a pair ``{"prompt": ..., "completion": ...}`` (a user turn and its answer).
A line that is not one of these refuses the whole file (:class:`TrainingDataError`, naming the
lines): a broken row is a bug in whatever produced the file, not something to drop silently.
Curation then removes, and counts, what would only hurt training: rows whose answer is empty,
rows longer than the model's window (truncating them would cut off the answer) and duplicates,
exact or differing only in case, spacing and punctuation, which would otherwise weigh twice and,
across the split, leak validation rows into training.
"""

from __future__ import annotations

import json
import random
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

Role = Literal["system", "user", "assistant"]
ROLES: frozenset[str] = frozenset({"system", "user", "assistant"})
MIN_ROWS = 50
"""Fewer curated rows than this is refused unless forced: too few to learn from and to measure."""
_SHOWN_ERRORS = 5
_NOT_WORD = re.compile(r"[\W_]+")


class TrainingDataError(ValueError):
    """The data cannot be trained on as it is; the message says which lines and why."""


@dataclass(frozen=True)
class Message:
    role: Role
    content: str


@dataclass(frozen=True)
class Example:
    """One conversation; the loss is taken on its assistant turns only."""

    messages: tuple[Message, ...]
    line: int
    """1-based line in the file it came from (for reports)."""

    @property
    def answer(self) -> str:
        """The last assistant turn: what the task metric compares."""
        return next(m.content for m in reversed(self.messages) if m.role == "assistant")

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Every turn before the last assistant turn: what the model is asked at evaluation."""
        last = max(i for i, m in enumerate(self.messages) if m.role == "assistant")
        return self.messages[:last]

    def to_json(self) -> dict[str, Any]:
        return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]}


@dataclass
class CurationReport:
    """What curation removed, by reason; reported to the user and in the model card."""

    read: int = 0
    empty: list[int] = field(default_factory=list)
    too_long: list[int] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)
    kept: int = 0

    def to_json(self) -> dict[str, int]:
        return {
            "read": self.read,
            "empty": len(self.empty),
            "too_long": len(self.too_long),
            "duplicates": len(self.duplicates),
            "kept": self.kept,
        }

    def summary(self) -> str:
        return (
            f"{self.read} rows read, {self.kept} kept; removed {len(self.empty)} empty, "
            f"{len(self.too_long)} too long, {len(self.duplicates)} duplicates"
        )


@dataclass(frozen=True)
class DataSplit:
    train: tuple[Example, ...]
    validation: tuple[Example, ...]
    train_report: CurationReport
    validation_report: CurationReport | None
    """None when the validation rows were split off the training file."""
    leaked: int = 0
    """Validation rows dropped because they duplicate a training row."""


def read_examples(path: Path) -> list[Example | None]:
    """Every line of ``path`` as an example; None for a blank line or an empty answer."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TrainingDataError(f"{path}: no such file") from None
    except UnicodeDecodeError as exc:
        raise TrainingDataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    rows: list[Example | None] = []
    errors: list[str] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            rows.append(None)
            continue
        try:
            rows.append(_parse_row(line, number))
        except TrainingDataError as exc:
            errors.append(f"line {number}: {exc}")
    if errors:
        more = f" (and {len(errors) - _SHOWN_ERRORS} more)" if len(errors) > _SHOWN_ERRORS else ""
        raise TrainingDataError(f"{path}: " + "; ".join(errors[:_SHOWN_ERRORS]) + more)
    if not any(rows):
        raise TrainingDataError(f"{path}: no examples (the file is empty)")
    return rows


def _parse_row(line: str, number: int) -> Example | None:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TrainingDataError(f"not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(row, dict):
        raise TrainingDataError(f"expected a JSON object, got {type(row).__name__}")
    if "messages" in row:
        messages = _parse_messages(row["messages"])
    elif "prompt" in row and "completion" in row:
        prompt, completion = row["prompt"], row["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise TrainingDataError('"prompt" and "completion" must be strings')
        messages = (Message("user", prompt), Message("assistant", completion))
    else:
        raise TrainingDataError('expected "messages", or "prompt" and "completion"')
    if not messages[-1].content.strip() or not any(m.content.strip() for m in messages[:-1]):
        return None
    return Example(messages, number)


def _parse_messages(raw: object) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise TrainingDataError('"messages" must be a non-empty list')
    messages: list[Message] = []
    for index, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("content"), str):
            raise TrainingDataError(f"messages[{index}] needs a string content")
        role = item.get("role")
        if role not in ROLES:
            raise TrainingDataError(f"messages[{index}].role is {role!r}; expected one of {sorted(ROLES)}")
        messages.append(Message(role, item["content"]))
    if not any(m.role == "user" for m in messages):
        raise TrainingDataError("no user message")
    if messages[-1].role != "assistant":
        raise TrainingDataError("the last message must be the assistant's answer")
    return tuple(messages)


def normalise(text: str) -> str:
    """Lower case, every run of punctuation and spacing one space: what "the same text" means."""
    return _NOT_WORD.sub(" ", text.casefold()).strip()


def near_duplicate_key(example: Example) -> tuple[tuple[str, str], ...]:
    """Equal for rows that differ only in case, spacing, punctuation or Unicode form."""
    return tuple((m.role, normalise(unicodedata.normalize("NFKC", m.content))) for m in example.messages)


def curate(
    rows: Sequence[Example | None], *, length: Callable[[Example], int], max_length: int
) -> tuple[list[Example], CurationReport]:
    """Drop empty, over-long (``length`` in tokens above ``max_length``) and duplicate rows."""
    report = CurationReport(read=len(rows))
    kept: list[Example] = []
    seen: set[tuple[tuple[str, str], ...]] = set()
    for number, example in enumerate(rows, start=1):
        if example is None:
            report.empty.append(number)
            continue
        key = near_duplicate_key(example)
        if key in seen:
            report.duplicates.append(example.line)
        elif length(example) > max_length:
            report.too_long.append(example.line)
        else:
            seen.add(key)
            kept.append(example)
    report.kept = len(kept)
    return kept, report


def load_split(
    train_path: Path,
    *,
    validation_path: Path | None,
    validation_fraction: float,
    seed: int,
    length: Callable[[Example], int],
    max_length: int,
    min_rows: int = MIN_ROWS,
    force: bool = False,
) -> DataSplit:
    """Curate the training file and split it (seeded), or curate the given validation file."""
    train, train_report = curate(read_examples(train_path), length=length, max_length=max_length)
    validation_report = None
    leaked = 0
    if validation_path is None:
        shuffled = list(train)
        random.Random(seed).shuffle(shuffled)
        cut = round(len(shuffled) * validation_fraction)
        validation, train = shuffled[:cut], shuffled[cut:]
    else:
        validation, validation_report = curate(
            read_examples(validation_path), length=length, max_length=max_length
        )
        in_train = {near_duplicate_key(e) for e in train}
        clean = [e for e in validation if near_duplicate_key(e) not in in_train]
        leaked, validation = len(validation) - len(clean), clean
    total = len(train) + len(validation)
    if total < min_rows and not force:
        raise TrainingDataError(
            f"only {total} usable rows after curation ({train_report.summary()}): too few to learn "
            f"from and to measure; at least {min_rows} are needed (--force trains anyway)"
        )
    if not train or not validation:
        raise TrainingDataError(
            f"{len(train)} training and {len(validation)} validation rows: both need at least one"
        )
    return DataSplit(tuple(train), tuple(validation), train_report, validation_report, leaked)
