"""Read the header of a safetensors file, and only the header.

The format is an 8-byte little-endian length, that many bytes of JSON (tensor name -> dtype,
shape, byte offsets), then raw tensor data. Reading the header tells us every tensor's name and
shape without executing anything: there is no pickle in this path, ever. The header is checked
against the file's real size so that a truncated or forged file is refused here rather than
inside the engine.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

MAX_HEADER_BYTES = 100 * 1024 * 1024
"""The format's own reference reader refuses headers over 100 MB; so do we, before reading one."""

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip


class SafetensorsHeaderError(ValueError):
    """The file is not a well-formed safetensors file."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def read_header(path: Path, *, max_header_bytes: int = MAX_HEADER_BYTES) -> dict[str, TensorInfo]:
    """Tensor name -> dtype and shape, from the header alone; the data is never read."""
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
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except ValueError as exc:  # bad UTF-8 or bad JSON
        raise SafetensorsHeaderError(f"the header is not JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SafetensorsHeaderError("the header is not a JSON object")
    data_bytes = size - 8 - length
    return {
        name: _tensor(name, entry, data_bytes) for name, entry in header.items() if name != "__metadata__"
    }


def _tensor(name: str, entry: object, data_bytes: int) -> TensorInfo:
    if not isinstance(entry, dict):
        raise SafetensorsHeaderError(f"tensor {name!r}: its header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str):
        raise SafetensorsHeaderError(f"tensor {name!r}: no dtype")
    if not isinstance(shape, list) or not all(_count(d) for d in shape):
        raise SafetensorsHeaderError(f"tensor {name!r}: the shape is not a list of sizes")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(o) for o in offsets)):
        raise SafetensorsHeaderError(f"tensor {name!r}: data_offsets is not [begin, end]")
    begin, end = offsets
    if not begin <= end <= data_bytes:
        raise SafetensorsHeaderError(f"tensor {name!r}: its data lies outside the file (truncated?)")
    itemsize = DTYPE_BYTES.get(dtype)
    # Exotic dtypes (sub-byte floats) are passed through; callers that care check the dtype.
    if itemsize is not None and end - begin != math.prod(shape) * itemsize:
        raise SafetensorsHeaderError(f"tensor {name!r}: {end - begin} bytes do not hold {dtype}{shape}")
    return TensorInfo(dtype, tuple(shape))


def _count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
