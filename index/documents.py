"""Documents as the index receives them, and the checks every way in applies to them.

A :class:`SourceDocument` is what the chunker reads: sections of paragraphs under heading paths.
The ``check_*`` functions validate what an operator supplies (sources, titles, metadata,
expiry); each problem is a :class:`DocumentError` whose ``param`` names the field to fix.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from index.errors import DocumentError

MetadataValue = str | int | float | bool

RESERVED_METADATA_KEYS: frozenset[str] = frozenset(
    {"source", "title", "position", "heading", "page", "ingested_at", "expires_at", "content_hash"}
    | {"document_hash", "chunks"}
)
_MAX_SOURCE_CHARS = 512
MAX_TITLE_CHARS = 512
_MAX_METADATA_KEYS = 32
_MAX_METADATA_KEY_CHARS = 64
_MAX_METADATA_VALUE_CHARS = 1024
_INT64 = 2**63  # the store keeps integers as int64
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Section:
    """Paragraphs under one heading path (``"Refunds > Exceptions"``), or one PDF page."""

    heading: str | None
    paragraphs: tuple[str, ...]
    page: int | None = None


@dataclass(frozen=True)
class SourceDocument:
    """One document as the chunker sees it; ``metadata`` holds user keys only."""

    source: str
    title: str | None
    sections: tuple[Section, ...]
    metadata: Mapping[str, MetadataValue]
    expires_at: datetime | None


def check_source(value: object, param: str) -> str:
    """A document's source, stripped: non-empty, short and free of control characters."""
    if not isinstance(value, str):
        raise DocumentError(f"source must be a string, not {describe_type(value)}", param)
    source = value.strip()
    if not source:
        raise DocumentError("source is empty; give the document a name or path", param)
    check_length("source", source, _MAX_SOURCE_CHARS, param)
    if _CONTROL.search(source):
        raise DocumentError(f"source {source!r} contains control characters (such as newlines)", param)
    return source


def check_title(value: object, param: str) -> str | None:
    """An optional title with whitespace collapsed; blank means none."""
    if value is None:
        return None
    if not isinstance(value, str):
        raise DocumentError(f"title must be a string, not {describe_type(value)}", param)
    title = collapse_whitespace(value)
    check_length("title", title, MAX_TITLE_CHARS, param)
    return title or None


def check_metadata(value: object, param: str) -> dict[str, MetadataValue]:
    """User metadata: a few short keys to scalar values, none of them a key the index sets itself."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise DocumentError(f"metadata must be an object, not {describe_type(value)}", param)
    if len(value) > _MAX_METADATA_KEYS:
        raise DocumentError(
            f"metadata has {len(value)} keys; at most {_MAX_METADATA_KEYS} are allowed", param
        )
    checked: dict[str, MetadataValue] = {}
    for key, item in value.items():
        check_metadata_key(key, param)
        checked[key] = check_metadata_value(key, item, param)
    return checked


def check_metadata_key(key: object, param: str) -> None:
    if not isinstance(key, str) or not key.strip():
        raise DocumentError(f"metadata keys must be non-empty strings, not {key!r}", param)
    check_length(f"metadata key {key[:20]!r}...", key, _MAX_METADATA_KEY_CHARS, param)
    if key in RESERVED_METADATA_KEYS:
        raise DocumentError(
            f"metadata key {key!r} is reserved (the index sets it); rename it. "
            f"Reserved keys: {', '.join(sorted(RESERVED_METADATA_KEYS))}",
            param,
        )
    # '$' and '#' open the store's filter operators and special keys: such a key could not be filtered on.
    if key[0] in "$#" or _CONTROL.search(key):
        raise DocumentError(
            f"metadata key {key!r} must not start with '$' or '#' or hold control characters", param
        )


def check_metadata_value(key: str, value: object, param: str) -> MetadataValue:
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        if not -_INT64 <= value < _INT64:
            raise DocumentError(f"metadata {key!r} is an integer out of the 64-bit range", param)
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise DocumentError(f"metadata {key!r} is {value}; numbers must be finite", param)
        return value
    if isinstance(value, str):
        check_length(f"metadata {key!r}", value, _MAX_METADATA_VALUE_CHARS, param)
        return value
    raise DocumentError(
        f"metadata {key!r} is {describe_type(value)}; values must be a string, number or boolean "
        "(no null, lists or nested objects)",
        param,
    )


def parse_expires_at(value: object, param: str) -> datetime | None:
    """An ISO 8601 date or time (naive means UTC) or seconds since the epoch, as an aware UTC datetime."""
    if value is None:
        return None
    hint = (
        "use an ISO 8601 date or time such as 2026-12-31 or 2026-12-31T12:00:00Z, or seconds since the epoch"
    )
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=UTC)
        except (OverflowError, OSError, ValueError):
            raise DocumentError(f"expires_at {value!r} is not a usable time; {hint}", param) from None
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise DocumentError(f"expires_at {value!r} is not a date or time; {hint}", param) from None
    else:
        raise DocumentError(
            f"expires_at must be a string or a number, not {describe_type(value)}; {hint}", param
        )
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def check_length(what: str, value: str, limit: int, param: str) -> None:
    if len(value) > limit:
        raise DocumentError(f"{what} is {len(value)} characters; at most {limit} are allowed", param)


def describe_type(value: object) -> str:
    names = {type(None): "null", bool: "a boolean", int: "a number", float: "a number", str: "a string"}
    if isinstance(value, Mapping | list | tuple):
        return "an object" if isinstance(value, Mapping) else "a list"
    return names.get(type(value), f"a {type(value).__name__}")


def collapse_whitespace(text: str) -> str:
    return " ".join(text.split())
