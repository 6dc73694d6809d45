"""Uploaded files and submitted text to documents (see :mod:`index.documents`), before chunking.

Pure functions over the given bytes or text: no store, no embedder. Every problem is a
:class:`DocumentError` (or :class:`UnsupportedFormat`) whose ``param`` names the field to fix.
"""

from __future__ import annotations

import io
import json
import os
import re
import warnings
from collections.abc import Mapping
from datetime import datetime
from types import MappingProxyType

import pypdf

from index.documents import (
    MAX_TITLE_CHARS,
    Section,
    SourceDocument,
    check_metadata,
    check_source,
    check_title,
    collapse_whitespace,
    describe_type,
    parse_expires_at,
)
from index.errors import DocumentError, UnsupportedFormat
from index.markup import HTMLText, markdown_sections

SUPPORTED_EXTENSIONS: Mapping[str, str] = MappingProxyType(
    {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".html": "html"}
    | {".htm": "html", ".pdf": "pdf", ".jsonl": "jsonl", ".ndjson": "jsonl"}
)
_CONTENT_TYPES: Mapping[str, tuple[str, ...]] = {
    "text": ("text/plain",),
    "markdown": ("text/markdown", "text/x-markdown", "text/plain"),
    "html": ("text/html", "application/xhtml+xml"),
    "pdf": ("application/pdf",),
    "jsonl": (
        "application/jsonl",
        "application/x-ndjson",
        "application/x-jsonlines",
        "application/json",
        "text/plain",
    ),
}
_ANY_CONTENT_TYPE = frozenset({"", "application/octet-stream"})


def text_document(
    source: str,
    text: str,
    *,
    title: str | None = None,
    metadata: Mapping[str, object] | None = None,
    expires_at: str | int | float | datetime | None = None,
    param: str = "documents",
) -> SourceDocument:
    """A document from the JSON admin API; ``text`` is read as Markdown (its '#' headings are kept).

    ``param`` is the JSON path errors are reported under, e.g. ``documents[2]``.
    """
    source = check_source(source, f"{param}.source")
    title = check_title(title, f"{param}.title")
    user_metadata = check_metadata(metadata, f"{param}.metadata")
    expiry = parse_expires_at(expires_at, f"{param}.expires_at")
    if not isinstance(text, str):
        raise DocumentError(f"text must be a string, not {describe_type(text)}", f"{param}.text")
    sections, first_h1 = markdown_sections(_newlines(text))
    if not sections:
        raise DocumentError("text is empty: it has no paragraphs to index", f"{param}.text")
    return SourceDocument(source, title or first_h1, sections, user_metadata, expiry)


def load_file(data: bytes, filename: str, content_type: str | None = None) -> list[SourceDocument]:
    """Read an uploaded file: one document whose source is the file name, or one per JSONL record."""
    kind = _format(filename, content_type)
    source = check_source(filename, "file")
    if not data:
        raise DocumentError(f"{filename} is empty", "file")
    if kind == "pdf":
        title, sections = _pdf(data, filename)
    else:
        text = _decode(data, filename)
        if kind == "jsonl":
            return _jsonl(text, filename)
        if kind == "html":
            title, sections = HTMLText().read(text)
        elif kind == "markdown":
            sections, title = markdown_sections(text)
        else:
            paragraphs, title = tuple(_blocks(text)), None
            sections = (Section(None, paragraphs),) if paragraphs else ()
        if not sections:
            raise DocumentError(f"{filename} has no text to index", "file")
    return [SourceDocument(source, _derived_title(title), sections, {}, None)]


# --- formats -------------------------------------------------------------------------------------


def _format(filename: str, content_type: str | None) -> str:
    supported = ", ".join(SUPPORTED_EXTENSIONS)
    extension = os.path.splitext(filename)[1].lower()
    kind = SUPPORTED_EXTENSIONS.get(extension)
    if kind is None:
        raise UnsupportedFormat(
            f"cannot read {filename!r}: supported file extensions are {supported}", "file"
        )
    media_type = (content_type or "").split(";", 1)[0].strip().lower()
    if media_type not in _ANY_CONTENT_TYPE and media_type not in _CONTENT_TYPES[kind]:
        raise UnsupportedFormat(
            f"{filename!r} was sent as {media_type!r}, which does not match its {extension} extension "
            f"(expected {' or '.join(_CONTENT_TYPES[kind])}); supported extensions are {supported}",
            "file",
        )
    return kind


def _decode(data: bytes, filename: str) -> str:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError(
            f"{filename} is not UTF-8 text (byte {exc.start} is invalid); save it as UTF-8", "file"
        ) from None
    if "\x00" in text:  # UTF-16 without a BOM, or a binary file under a text name
        raise DocumentError(f"{filename} contains NUL bytes: it is binary or UTF-16, not UTF-8 text", "file")
    if not text.strip():
        raise DocumentError(f"{filename} contains only whitespace", "file")
    return _newlines(text)


def _newlines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _derived_title(title: str | None) -> str | None:
    # A title read from inside a file is a convenience: trim it rather than refuse the file.
    title = collapse_whitespace(title or "")
    return title[:MAX_TITLE_CHARS] or None


def _blocks(text: str) -> list[str]:
    """Blank-line separated blocks, each joined onto one line."""
    return [p for p in (collapse_whitespace(block) for block in re.split(r"\n[^\S\n]*\n", text)) if p]


def _pdf(data: bytes, filename: str) -> tuple[str | None, tuple[Section, ...]]:
    """One section per page with text; the title from the PDF's metadata."""
    try:
        # pypdf warns about every oddity of real-world PDFs; none of it is the operator's to act on.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = pypdf.PdfReader(io.BytesIO(data))
            if reader.is_encrypted and reader.decrypt("") == pypdf.PasswordType.NOT_DECRYPTED:
                raise DocumentError(
                    f"{filename} is encrypted with a password; upload an unprotected copy", "file"
                )
            pages = [page.extract_text() or "" for page in reader.pages]
            title = _pdf_title(reader)
    except DocumentError:
        raise
    except Exception as exc:  # pypdf raises a wide, undocumented range for damaged files
        raise DocumentError(f"{filename} is not a readable PDF: {exc}", "file") from exc
    sections = tuple(
        Section(None, tuple(paragraphs), page=number)
        for number, text in enumerate(pages, start=1)
        if (paragraphs := _blocks(_newlines(text)))
    )
    if not sections:
        raise DocumentError(
            f"{filename} has no extractable text; a scanned PDF needs OCR (text recognition) first", "file"
        )
    return title, sections


def _pdf_title(reader: pypdf.PdfReader) -> str | None:
    try:
        title = reader.metadata.title if reader.metadata is not None else None
    except Exception:  # a damaged /Info dictionary costs the title, not the document
        return None
    return title if isinstance(title, str) else None


def _jsonl(text: str, filename: str) -> list[SourceDocument]:
    """One document per JSON object line; errors name the line."""
    documents: list[SourceDocument] = []
    seen: dict[str, int] = {}
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            document = _record(line, f"{filename}#{number}")
        except DocumentError as exc:
            raise DocumentError(f"{filename} line {number}: {exc.message}", "file") from None
        if document.source in seen:
            raise DocumentError(
                f"{filename} line {number}: source {document.source!r} is already used on line "
                f"{seen[document.source]}; sources must be unique within a file",
                "file",
            )
        seen[document.source] = number
        documents.append(document)
    if not documents:
        raise DocumentError(f"{filename} has no records", "file")
    return documents


def _record(line: str, default_source: str) -> SourceDocument:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DocumentError(f"not valid JSON ({exc.msg} at column {exc.colno})", "file") from None
    if not isinstance(record, dict):
        raise DocumentError(f"expected a JSON object, got {describe_type(record)}", "file")
    if "text" not in record:
        raise DocumentError("'text' is missing; each record needs the document's text", "file")
    fields = dict(record)
    text, source, title, expires_at = (
        fields.pop(key, None) for key in ("text", "source", "title", "expires_at")
    )
    metadata = check_metadata(fields.pop("metadata", None), "file")
    if clash := sorted(fields.keys() & metadata.keys()):
        raise DocumentError(
            f"metadata key {clash[0]!r} is given both in 'metadata' and at the top level", "file"
        )
    metadata.update(fields)  # the other top-level fields are metadata too; text_document checks them
    source = default_source if source is None else source
    return text_document(source, text, title=title, metadata=metadata, expires_at=expires_at, param="file")
