"""Training data: parsing with errors that name the line, curation (reported), the seeded split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from adapters.training_data import (
    Example,
    TrainingDataError,
    curate,
    load_split,
    near_duplicate_key,
    read_examples,
)


def chat(question: str, answer: str, system: str | None = None) -> dict[str, Any]:
    messages = [{"role": "system", "content": system}] if system else []
    return {
        "messages": [
            *messages,
            {"role": "user", "content": question},
            {"role": "assistant", "content": answer},
        ]
    }


def write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def words(example: Example) -> int:
    return sum(len(m.content.split()) for m in example.messages)


def distinct(n: int) -> list[dict[str, Any]]:
    return [chat(f"question number {i} about topic {i * 7}", f"answer {i}") for i in range(n)]


def test_both_row_shapes_are_read(tmp_path: Path) -> None:
    rows = read_examples(
        write(
            tmp_path / "d.jsonl",
            [chat("Hi?", "Hello.", system="Be brief."), {"prompt": "2+2?", "completion": "4"}],
        )
    )
    assert [r.answer for r in rows if r] == ["Hello.", "4"]
    assert [m.role for m in rows[1].prompt] == ["user"]  # type: ignore[union-attr]
    assert [r.line for r in rows if r] == [1, 2]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [', "line 2: not valid JSON"),
        ("[1, 2]", "line 2: expected a JSON object, got list"),
        ('{"text": "hello"}', 'line 2: expected "messages", or "prompt" and "completion"'),
        ('{"messages": [{"content": "hi"}]}', "line 2: messages[0].role is None"),
        ('{"messages": [{"role": "bot", "content": "hi"}]}', "messages[0].role is 'bot'"),
        ('{"messages": [{"role": "assistant", "content": "hi"}]}', "line 2: no user message"),
        ('{"messages": [{"role": "user", "content": "hi"}]}', "the last message must be the assistant's"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}', "needs a string content"),
        ('{"prompt": 1, "completion": "x"}', '"prompt" and "completion" must be strings'),
        ('{"messages": []}', '"messages" must be a non-empty list'),
    ],
)
def test_a_bad_row_refuses_the_file_naming_its_line(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "d.jsonl", [chat("fine", "row"), line])
    with pytest.raises(TrainingDataError, match=r"d\.jsonl") as caught:
        read_examples(path)
    assert message in str(caught.value)


def test_many_bad_rows_are_summarised(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", ["nope"] * 8)
    with pytest.raises(TrainingDataError, match=r"line 5: .*\(and 3 more\)"):
        read_examples(path)


@pytest.mark.parametrize("content", ["", "\n\n", "   \n"])
def test_an_empty_file_is_refused(tmp_path: Path, content: str) -> None:
    (tmp_path / "d.jsonl").write_text(content)
    with pytest.raises(TrainingDataError, match="no examples"):
        read_examples(tmp_path / "d.jsonl")


def test_missing_and_non_utf8_files_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TrainingDataError, match="no such file"):
        read_examples(tmp_path / "absent.jsonl")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9", "completion": "x"}\n')
    with pytest.raises(TrainingDataError, match="not UTF-8"):
        read_examples(tmp_path / "latin1.jsonl")


def test_curation_removes_and_reports_empty_long_and_duplicate_rows(tmp_path: Path) -> None:
    rows = read_examples(
        write(
            tmp_path / "d.jsonl",
            [
                chat("What is the rate?", "Two percent."),
                chat("what is the RATE", "two percent"),  # near-exact: case and punctuation
                chat("What  is the rate?", "Two percent."),  # near-exact: spacing
                chat("What is the rate?", "Three percent."),  # another answer: kept
                chat("Empty answer", "   "),
                chat("   ", "an answer to nothing"),
                "",
                chat("long " * 50, "answer"),
                {"prompt": "What is the rate?", "completion": "Two percent."},  # same as row 1
            ],
        )
    )
    kept, report = curate(rows, length=words, max_length=20)
    assert [e.line for e in kept] == [1, 4]
    assert report.duplicates == [2, 3, 9]
    assert report.empty == [5, 6, 7]
    assert report.too_long == [8]
    assert report.to_json() == {"read": 9, "empty": 3, "too_long": 1, "duplicates": 3, "kept": 2}
    assert "9 rows read, 2 kept" in report.summary()


def test_near_duplicate_key_ignores_form_not_meaning(tmp_path: Path) -> None:
    def example(q: str, a: str) -> Example:
        row = read_examples(write(tmp_path / "d.jsonl", [chat(q, a)]))[0]
        assert row is not None
        return row

    assert near_duplicate_key(example("Ｃafé?", "Yes")) == near_duplicate_key(example("café", "yes!"))
    assert near_duplicate_key(example("cafe", "yes")) != near_duplicate_key(example("cafe", "no"))


def test_the_split_is_seeded_disjoint_and_eighty_twenty(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", distinct(100))

    def split(seed: int) -> tuple[list[int], list[int]]:
        s = load_split(
            path, validation_path=None, validation_fraction=0.2, seed=seed, length=words, max_length=99
        )
        return [e.line for e in s.train], [e.line for e in s.validation]

    train, validation = split(0)
    assert (len(train), len(validation)) == (80, 20)
    assert not set(train) & set(validation)
    assert split(0) == (train, validation)
    assert split(1) != (train, validation)


def test_a_validation_file_is_curated_and_loses_rows_seen_in_training(tmp_path: Path) -> None:
    train = write(tmp_path / "train.jsonl", distinct(60))
    validation = write(tmp_path / "val.jsonl", [*distinct(3), chat("new question", "new answer")] * 2)
    split = load_split(
        train, validation_path=validation, validation_fraction=0.2, seed=0, length=words, max_length=99
    )
    assert len(split.train) == 60
    assert [e.answer for e in split.validation] == ["new answer"]
    assert split.leaked == 3
    assert split.validation_report is not None
    assert split.validation_report.to_json()["duplicates"] == 4


def test_too_few_rows_are_refused_unless_forced(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", [*distinct(30), *distinct(30)])  # 60 rows, 30 distinct
    with pytest.raises(TrainingDataError, match=r"only 30 usable rows.*30 duplicates.*--force"):
        load_split(path, validation_path=None, validation_fraction=0.2, seed=0, length=words, max_length=99)
    forced = load_split(
        path, validation_path=None, validation_fraction=0.2, seed=0, length=words, max_length=99, force=True
    )
    assert (len(forced.train), len(forced.validation)) == (24, 6)


def test_an_empty_side_of_the_split_is_refused(tmp_path: Path) -> None:
    path = write(tmp_path / "d.jsonl", distinct(2))
    with pytest.raises(TrainingDataError, match="2 training and 0 validation rows"):
        load_split(
            path,
            validation_path=None,
            validation_fraction=0.2,
            seed=0,
            length=words,
            max_length=99,
            force=True,
        )
