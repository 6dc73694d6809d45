"""Padded batches of encoded examples, grouped by length so that little compute goes to padding."""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from adapters.chat_tokens import IGNORE, Encoded

if TYPE_CHECKING:
    import torch

_GROUP = 32
"""Batches per length-sorted group: long enough to pad little, short enough to stay shuffled."""


def collate(rows: Sequence[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``labels`` (padding labelled -100)."""
    import torch

    width = max(len(r.input_ids) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row.input_ids)
        ids[i, :n] = torch.tensor(row.input_ids)
        labels[i, :n] = torch.tensor(row.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def to_device(batch: dict[str, torch.Tensor], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def training_order(rows: Sequence[Encoded], batch_size: int, rng: random.Random) -> list[list[Encoded]]:
    """One epoch: shuffled, then sorted by length within groups, then the batches shuffled."""
    order = list(rows)
    rng.shuffle(order)
    span = batch_size * _GROUP
    batches: list[list[Encoded]] = []
    for start in range(0, len(order), span):
        group = sorted(order[start : start + span], key=lambda r: len(r.input_ids))
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def evaluation_batches(rows: Sequence[Encoded], batch_size: int) -> Iterator[list[Encoded]]:
    """Every row once, longest first (the first batch shows at once whether memory suffices)."""
    ordered = sorted(rows, key=lambda r: -len(r.input_ids))
    for start in range(0, len(ordered), batch_size):
        yield ordered[start : start + batch_size]
