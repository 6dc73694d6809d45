"""Hand-made safetensors layouts: a real adapter's file rewritten with its tensors' byte ranges
gapped, overlapping, cut short or followed by stray bytes, for the validation tests of both tiers.

Plain ``json`` and ``struct``: what such a file is, byte for byte, without a library that would
refuse to write it (and without torch, so the torch-free gateway test can use it too).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

Header = dict[str, Any]
Layout = Callable[[Header, bytes], tuple[Header, bytes]]


def split(content: bytes) -> tuple[Header, bytes]:
    """The header (as JSON) and the data bytes of a safetensors file."""
    (length,) = struct.unpack("<Q", content[:8])
    header: Header = json.loads(content[8 : 8 + length])
    return header, content[8 + length :]


def join(header: Header, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


def tensors_in_order(header: Header) -> list[str]:
    """Tensor names by where their data starts."""
    names = [name for name in header if name != "__metadata__"]
    return sorted(names, key=lambda name: header[name]["data_offsets"][0])


def _shift_from(header: Header, first: str, by: int) -> None:
    """Move ``first`` and every tensor stored after it by ``by`` bytes."""
    start = header[first]["data_offsets"][0]
    for name in tensors_in_order(header):
        begin, end = header[name]["data_offsets"]
        if begin >= start:
            header[name]["data_offsets"] = [begin + by, end + by]


def gap(header: Header, data: bytes) -> tuple[Header, bytes]:
    """Eight unused bytes between the first two tensors; every size still matches."""
    second = tensors_in_order(header)[1]
    at = header[second]["data_offsets"][0]
    _shift_from(header, second, 8)
    return header, data[:at] + b"\x00" * 8 + data[at:]


def overlap(header: Header, data: bytes) -> tuple[Header, bytes]:
    """The second tensor starts eight bytes inside the first (the rest follows it back)."""
    second = tensors_in_order(header)[1]
    at = header[second]["data_offsets"][0]
    _shift_from(header, second, -8)
    return header, data[: at - 8] + data[at:]


def trailing(header: Header, data: bytes) -> tuple[Header, bytes]:
    """Sixteen bytes after the last tensor's data."""
    return header, data + b"\x00" * 16


def cut_short(header: Header, data: bytes) -> tuple[Header, bytes]:
    """The header declares the last tensor in full; the file ends eight bytes early."""
    return header, data[:-8]


def wrong_shape(header: Header, data: bytes) -> tuple[Header, bytes]:
    """The first tensor's shape claims one row fewer than its bytes hold."""
    first = tensors_in_order(header)[0]
    shape = header[first]["shape"]
    header[first]["shape"] = [shape[0] - 1, *shape[1:]]
    return header, data


LAYOUTS: dict[str, Layout] = {
    "gap": gap,
    "overlap": overlap,
    "trailing-bytes": trailing,
    "cut-short": cut_short,
    "dtype-shape-size-mismatch": wrong_shape,
}
"""Each breaks only the layout: tensor names, dtypes and LoRA shapes stay those of a valid adapter."""

MESSAGES = {
    "gap": "a gap or an overlap",
    "overlap": "a gap or an overlap",
    "trailing-bytes": "fill the file exactly",
    "cut-short": "fill the file exactly",
    "dtype-shape-size-mismatch": "does not hold its dtype and shape",
}
"""A fragment of the message each layout is refused with."""


def rewritten(weights: Path, layout: Layout) -> bytes:
    """The bytes of ``weights`` with ``layout`` applied."""
    header, data = split(weights.read_bytes())
    return join(*layout(header, data))
