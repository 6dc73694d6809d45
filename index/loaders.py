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
from html.parser import HTMLParser
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
    sections, first_h1 = _markdown(_newlines(text))
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
            title, sections = _HTMLText().read(text)
        elif kind == "markdown":
            sections, title = _markdown(text)
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


class _Sections:
    """Collects sections as headings arrive: a heading stack and the paragraphs under it."""

    def __init__(self) -> None:
        self.sections: list[Section] = []
        self.first_h1: str | None = None
        self._stack: list[tuple[int, str]] = []
        self._paragraphs: list[str] = []

    def heading(self, level: int, text: str) -> None:
        text = collapse_whitespace(text)
        if not text:
            return
        self._close()
        while self._stack and self._stack[-1][0] >= level:
            self._stack.pop()
        self._stack.append((level, text))
        if level == 1 and self.first_h1 is None:
            self.first_h1 = text

    def paragraph(self, text: str, *, preformatted: bool = False) -> None:
        if preformatted:
            lines = [line.rstrip() for line in text.split("\n")]
            text = "\n".join(lines).strip("\n") if any(lines) else ""
        else:
            text = collapse_whitespace(text)
        if text:
            self._paragraphs.append(text)

    def finish(self) -> tuple[Section, ...]:
        self._close()
        return tuple(self.sections)

    def _close(self) -> None:
        if self._paragraphs:
            heading = " > ".join(text for _, text in self._stack) or None
            self.sections.append(Section(heading, tuple(self._paragraphs)))
            self._paragraphs = []


_FRONT_MATTER = re.compile(r"---[ \t]*\n[A-Za-z_][\w-]*:.*?\n(?:---|\.\.\.)[ \t]*(?:\n|$)", re.DOTALL)
_ATX = re.compile(r" {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_ATX_CLOSING = re.compile(r"(?:^|[ \t]+)#+$")
_FENCE = re.compile(r"[ \t]*(`{3,}|~{3,})(.*)$")
_SETEXT = re.compile(r" {0,3}(?:=+|-+)[ \t]*$")
_THEMATIC_BREAK = re.compile(r" {0,3}([-*_])(?:[ \t]*\1){2,}[ \t]*$")
_TABLE_RULE = re.compile(r"[ \t]*\|?(?:[ \t]*:?-+:?[ \t]*\|)+(?:[ \t]*:?-+:?[ \t]*)?$")
# A list item or table row stands alone, as <li> and <td> do in HTML.
_OWN_LINE = re.compile(r"[ \t]*(?:[-*+]|\d{1,9}[.)])[ \t]+\S|[ \t]*\|")


def _markdown(text: str) -> tuple[tuple[Section, ...], str | None]:
    """Sections by ATX and setext headings; fenced code stays one paragraph, fences included."""
    if front_matter := _FRONT_MATTER.match(text):  # YAML metadata of static-site generators, not prose
        text = text[front_matter.end() :]
    out = _Sections()
    lines: list[str] = []
    fence: tuple[re.Pattern[str], str, list[str]] | None = None  # closing pattern, marker, lines so far

    def flush() -> None:
        out.paragraph(" ".join(lines))
        lines.clear()

    def close_fence(body: list[str], closing: str) -> None:
        while body and not body[-1].strip():
            body.pop()
        if len(body) > 1:  # body[0] is the opening fence
            out.paragraph("\n".join([*body, closing]), preformatted=True)

    for line in text.split("\n"):
        if fence is not None:
            if fence[0].fullmatch(line):
                close_fence(fence[2], fence[1])
                fence = None
            else:
                fence[2].append(line)
            continue
        if (match := _FENCE.match(line)) and not (match[1][0] == "`" and "`" in match[2]):
            flush()
            closing = re.compile(rf"[ \t]*{re.escape(match[1][0])}{{{len(match[1])},}}[ \t]*")
            fence = (closing, match[1], [line.strip()])
            continue
        if match := _ATX.match(line):
            flush()
            out.heading(len(match[1]), _ATX_CLOSING.sub("", match[2] or ""))
            continue
        if lines and _SETEXT.match(line) and not _OWN_LINE.match(lines[0]):
            out.heading(1 if "=" in line else 2, " ".join(lines))
            lines.clear()
            continue
        if not line.strip() or _THEMATIC_BREAK.match(line):
            flush()
            continue
        if "|" in line and _TABLE_RULE.match(line):
            continue
        if _OWN_LINE.match(line):
            flush()
        lines.append(line)
    if fence is not None:  # an unclosed fence runs to the end, as CommonMark reads it
        close_fence(fence[2], fence[1])
    flush()
    return out.finish(), out.first_h1


_SKIPPED = frozenset({"script", "style", "noscript", "template", "svg"})
_HEADINGS = {f"h{level}": level for level in range(1, 7)}
_BLOCKS = frozenset(
    {"address", "article", "aside", "blockquote", "br", "caption", "dd", "details", "dialog", "div"}
    | {"dl", "dt", "fieldset", "figcaption", "figure", "footer", "form", "header", "hr", "legend", "li"}
    | {"main", "nav", "ol", "p", "section", "summary", "table", "tbody", "td", "tfoot", "th", "thead"}
    | {"tr", "ul"}
)


class _HTMLText(HTMLParser):
    """Text of an HTML page as sections; the parser unescapes entities itself."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out = _Sections()
        self.title: str | None = None
        self._skipping = 0
        self._in_head = False
        self._title: list[str] | None = None
        self._heading: tuple[int, list[str]] | None = None
        self._pre = 0
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIPPED:
            self._skipping += 1
        elif tag == "head":
            self._in_head = True
        elif tag == "body":  # </head> is optional
            self._in_head = False
        elif self._skipping:
            return
        elif tag == "title":
            self._title = []
        elif tag in _HEADINGS:
            self._flush()
            self._heading = (_HEADINGS[tag], [])
        elif self._heading is not None or self._pre:
            if tag == "br":  # inside a heading or <pre>, a line break ends nothing
                (self._text if self._heading is None else self._heading[1]).append("\n")
        elif tag == "pre":
            self._flush()
            self._pre += 1
        elif tag in _BLOCKS:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            self._skipping = max(0, self._skipping - 1)
        elif tag == "head":
            self._in_head = False
        elif self._skipping:
            return
        elif tag == "title" and self._title is not None:
            if self.title is None:
                self.title = collapse_whitespace("".join(self._title)) or None
            self._title = None
        elif tag in _HEADINGS and self._heading is not None:
            self.out.heading(self._heading[0], "".join(self._heading[1]))
            self._heading = None
        elif tag == "pre" and self._pre:
            self._pre -= 1
            if not self._pre:
                self._flush(preformatted=True)
        elif tag in _BLOCKS and not self._pre:
            self._flush()

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        if self._title is not None:
            self._title.append(data)
        elif self._in_head:
            return
        elif self._heading is not None:
            self._heading[1].append(data)
        else:
            self._text.append(data)

    def read(self, text: str) -> tuple[str | None, tuple[Section, ...]]:
        self.feed(text)
        self.close()
        self._flush(preformatted=bool(self._pre))
        return self.title or self.out.first_h1, self.out.finish()

    def _flush(self, *, preformatted: bool = False) -> None:
        self.out.paragraph("".join(self._text), preformatted=preformatted)
        self._text = []


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
