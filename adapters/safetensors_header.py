"""Read what a safetensors file declares (every tensor's name, dtype and shape), never its data.

The file is checked by the format's own parser (``safetensors.safe_open``), the one vLLM loads
adapters with, so a file accepted here is one the engine accepts: the tensors' byte ranges must
follow one another with no gap and no overlap and fill the file exactly, and each range must hold
its dtype and shape. An earlier hand-written reader let gapped, overlapping or over-long files
through, to fail later inside the engine. ``framework="numpy"`` keeps torch out of the gateway,
and only metadata is asked for, so the dtypes numpy cannot hold (BF16) are no obstacle. There is
no pickle in this path, ever.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError, safe_open

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""Checked before the parser sees the file, so a forged length costs no allocation and gets a
message that says so (the parser's own limit is about the same)."""

# What the parser's faults mean for the file; before 0.6 it named them in Rust's Debug form.
_GAP = "each tensor's data must start where the previous one's ends (a gap or an overlap)"
_COVER = "the tensors' data must fill the file exactly (truncated, or bytes left over)"
_SIZE = "a tensor's byte range does not hold its dtype and shape"
_HINTS = {
    "invalid offset": _GAP,
    "InvalidOffset": _GAP,
    "not fully covered": _COVER,
    "MetadataIncompleteBuffer": _COVER,
    "invalid shape, data type, or offset": _SIZE,
    "TensorInvalidInfo": _SIZE,
}


class SafetensorsHeaderError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Tensor name -> dtype and shape, once the whole file's layout is checked; the data is
    never read. Raises :class:`SafetensorsHeaderError` for a malformed file, OSError if
    unreadable."""
    _check_length_prefix(path, max_header_bytes)
    try:
        with safe_open(str(path), framework="numpy") as tensors:
            found = {}
            for name in tensors.keys():  # noqa: SIM118 (safe_open is not iterable)
                view = tensors.get_slice(name)
                found[name] = TensorInfo(str(view.get_dtype()), tuple(int(d) for d in view.get_shape()))
            return found
    except SafetensorError as exc:
        raise SafetensorsHeaderError(_explain(str(exc))) from None


def _check_length_prefix(path: Path, max_header_bytes: int) -> None:
    """The 8-byte header length against the file's size and the cap."""
    with path.open("rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        prefix = handle.read(8)
    if len(prefix) < 8:
        raise SafetensorsHeaderError(f"{size} bytes is too short for a safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if length > max_header_bytes:
        raise SafetensorsHeaderError(
            f"the header claims {length} bytes, over the {max_header_bytes}-byte limit"
        )
    if length > size - 8:
        raise SafetensorsHeaderError(f"the header claims {length} bytes but the file has {size}")


def _explain(message: str) -> str:
    detail = message.removeprefix("Error while deserializing header: ")
    hints = [hint for fault, hint in _HINTS.items() if fault in detail]
    return f"{detail}: {hints[0]}" if hints else detail
