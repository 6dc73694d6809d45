"""Loaders: each format to sections, the shared validation of sources, titles, metadata and expiry,
and the errors (with their ``param``) that reach the operator."""

from __future__ import annotations

import io
import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pypdf
import pytest

from index.documents import RESERVED_METADATA_KEYS, Section, SourceDocument
from index.errors import DocumentError, UnsupportedFormat
from index.loaders import SUPPORTED_EXTENSIONS, load_file, text_document


def make_pdf(*pages: str, title: str | None = None) -> bytes:
    """A minimal valid PDF, written out by hand: one Helvetica text line per line of each page."""

    def escape(text: str) -> str:
        return text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    kids = " ".join(f"{4 + 2 * i} 0 R" for i in range(len(pages)))
    objects.append(f"<< /Type /Pages /Kids [{kids}] /Count {len(pages)} >>".encode())
    objects.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    for i, text in enumerate(pages):
        shown = " ".join(f"({escape(line)}) Tj T*" for line in text.split("\n"))
        content = f"BT /F1 12 Tf 14 TL 72 720 Td {shown} ET".encode() if text else b""
        objects.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
            f"/Resources << /Font << /F1 3 0 R >> >> /Contents {5 + 2 * i} 0 R >>".encode()
        )
        objects.append(b"<< /Length %d >>\nstream\n%s\nendstream" % (len(content), content))
    if title is not None:
        objects.append(f"<< /Title ({escape(title)}) >>".encode())
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % offset for offset in offsets)
    info = f" /Info {len(objects)} 0 R" if title is not None else ""
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R{info} >>\nstartxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def only(documents: list[SourceDocument]) -> SourceDocument:
    assert len(documents) == 1
    return documents[0]


def check(error: pytest.ExceptionInfo[DocumentError], param: str, *words: str) -> None:
    """The error names ``param`` and its message mentions every word (case-insensitively)."""
    assert error.value.param == param
    for word in words:
        assert word.lower() in error.value.message.lower(), error.value.message


# --- Markdown and plain text --------------------------------------------------------------------

MARKDOWN = """\
Before any heading,
hard-wrapped.

# Refunds

Refunds   take\tfive days.

## Exceptions

Sale items are final.

### Gift cards ###

Never refunded.

## Shipping

Ships in two days.

```python
def f():

    # a comment, not a heading
    return 1
```

# Contact

Write to us.
"""


def test_markdown_builds_heading_paths_and_keeps_fenced_code_whole() -> None:
    document = only(load_file(MARKDOWN.encode(), "policy.md"))

    assert document.source == "policy.md"
    assert document.title == "Refunds"
    assert document.metadata == {}
    assert document.expires_at is None
    assert document.sections == (
        Section(None, ("Before any heading, hard-wrapped.",)),
        Section("Refunds", ("Refunds take five days.",)),
        Section("Refunds > Exceptions", ("Sale items are final.",)),
        Section("Refunds > Exceptions > Gift cards", ("Never refunded.",)),
        Section(
            "Refunds > Shipping",
            (
                "Ships in two days.",
                "```python\ndef f():\n\n    # a comment, not a heading\n    return 1\n```",
            ),
        ),
        Section("Contact", ("Write to us.",)),
    )


def test_markdown_setext_headings_tilde_fences_and_unclosed_fence() -> None:
    text = (
        "Guide\n=====\n\nIntro.\n\nSetup\n-----\n\n~~~\nrun it\n\n# still code\n~~~\n\n```\nopen to the end\n"
    )
    document = text_document("guide", text)

    assert document.title == "Guide"
    assert document.sections == (
        Section("Guide", ("Intro.",)),
        Section("Guide > Setup", ("~~~\nrun it\n\n# still code\n~~~", "```\nopen to the end\n```")),
    )


def test_markdown_list_items_and_table_rows_stand_alone() -> None:
    text = "Steps:\n- one\n  more of one\n- two\n\n| a | b |\n|---|:-:|\n| 1 | 2 |\n\n---\n\nafter the rule"
    (section,) = text_document("steps", text).sections

    assert section.paragraphs == (
        "Steps:",
        "- one more of one",
        "- two",
        "| a | b |",
        "| 1 | 2 |",
        "after the rule",
    )


def test_markdown_front_matter_is_dropped_but_a_leading_rule_is_not() -> None:
    front = text_document("a", "---\ntitle: Draft\ntags: [a, b]\n---\n# Real\n\nBody.")
    rule = text_document("b", "---\n\nBody.")

    assert front.sections == (Section("Real", ("Body.",)),)
    assert rule.sections == (Section(None, ("Body.",)),)


def test_markdown_title_is_none_without_a_level_one_heading_and_explicit_title_wins() -> None:
    assert text_document("a", "## Only a sub\n\ntext").title is None
    assert text_document("a", "# Heading\n\ntext", title="  Chosen \n title ").title == "Chosen title"


def test_plain_text_is_paragraphs_in_one_section_and_ignores_hashes() -> None:
    data = "\ufeffFirst  paragraph\r\nwraps here.\r\n\r\n# not a heading\n\n \t \nLast."
    document = only(load_file(data.encode(), "notes.TXT", "text/plain; charset=utf-8"))

    assert document.title is None
    assert document.sections == (Section(None, ("First paragraph wraps here.", "# not a heading", "Last.")),)


# --- HTML ---------------------------------------------------------------------------------------

HTML = """<!doctype html>
<html><head><title>Refund &amp; Returns</title><style>p { color: red }</style>
<script>var x = "<p>not text</p>";</script><meta charset="utf-8"></head>
<body>
<nav>Home</nav>
<h1>Policy</h1>
<p>Refunds take <b>five</b>&nbsp;days &lt;always&gt;.</p>
<noscript>Enable JavaScript</noscript>
<h2>Exceptions <br>and limits</h2>
<ul><li>Sale items</li><li>Gift cards</li></ul>
<div>line one<br>line two</div>
<svg><text>drawn text</text></svg>
<pre>
  code  keeps   spaces<br>  after br

  and lines
</pre>
<h1>Contact</h1><template><p>hidden</p></template>
<table><tr><th>Mail</th><td>help@example.com</td></tr></table>
</body></html>"""


def test_html_headings_entities_pre_and_dropped_elements() -> None:
    document = only(load_file(HTML.encode(), "policy.html", "text/html; charset=UTF-8"))

    assert document.title == "Refund & Returns"
    assert document.sections == (
        Section(None, ("Home",)),
        Section("Policy", ("Refunds take five days <always>.",)),
        Section(
            "Policy > Exceptions and limits",
            (
                "Sale items",
                "Gift cards",
                "line one",
                "line two",
                "  code  keeps   spaces\n  after br\n\n  and lines",
            ),
        ),
        Section("Contact", ("Mail", "help@example.com")),
    )


def test_html_title_falls_back_to_the_first_h1_and_head_needs_no_end_tag() -> None:
    data = b"<html><head><meta name=x><body><h2>Sub</h2><h1>Main</h1><p>Text</p></body></html>"
    document = only(load_file(data, "page.htm"))

    assert document.title == "Main"
    assert document.sections == (Section("Main", ("Text",)),)


def test_html_with_only_scripts_has_no_text() -> None:
    with pytest.raises(DocumentError) as error:
        load_file(b"<html><script>alert(1)</script></html>", "empty.html")
    check(error, "file", "empty.html", "no text")


# --- PDF ----------------------------------------------------------------------------------------


def test_pdf_gives_one_section_per_page_with_text_and_the_metadata_title() -> None:
    data = make_pdf("Hello refund policy\nwrapped line", "", "Page (three)", title="Refund Policy")
    document = only(load_file(data, "policy.pdf", "application/pdf"))

    assert document.title == "Refund Policy"
    assert document.sections == (
        Section(None, ("Hello refund policy wrapped line",), page=1),
        Section(None, ("Page (three)",), page=3),
    )


def test_pdf_with_a_damaged_cross_reference_table_is_recovered_without_warnings() -> None:
    data = re.sub(rb"startxref\n\d+", b"startxref\n9999", make_pdf("Recovered text"))

    assert only(load_file(data, "damaged.pdf")).sections == (Section(None, ("Recovered text",), page=1),)


def test_pdf_without_a_title_has_none() -> None:
    assert only(load_file(make_pdf("Text"), "a.pdf")).title is None


def test_pdf_without_text_asks_for_ocr() -> None:
    with pytest.raises(DocumentError) as error:
        load_file(make_pdf("", ""), "scan.pdf")
    check(error, "file", "scan.pdf", "OCR")


@pytest.mark.parametrize(
    "data",
    [b"%PDF-1.4 garbage", b"just some text, not a PDF", make_pdf("Text")[:60]],
    ids=["garbage", "not-a-pdf", "truncated"],
)
def test_unreadable_pdf(data: bytes) -> None:
    with pytest.raises(DocumentError) as error:
        load_file(data, "broken.pdf")
    check(error, "file", "broken.pdf", "not a readable PDF")


def test_pdf_that_needs_a_password() -> None:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf("Secret text"))))
    writer.encrypt("user-password", "owner-password", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)

    with pytest.raises(DocumentError) as error:
        load_file(buffer.getvalue(), "locked.pdf")
    check(error, "file", "locked.pdf", "password")


def test_pdf_encrypted_with_an_empty_user_password_is_read() -> None:
    writer = pypdf.PdfWriter(clone_from=pypdf.PdfReader(io.BytesIO(make_pdf("Open text"))))
    writer.encrypt("", "owner-password", algorithm="RC4-128")
    buffer = io.BytesIO()
    writer.write(buffer)

    assert only(load_file(buffer.getvalue(), "open.pdf")).sections == (Section(None, ("Open text",), page=1),)


# --- files: formats, encodings, emptiness -------------------------------------------------------


def test_supported_extensions() -> None:
    assert dict(SUPPORTED_EXTENSIONS) == {
        ".txt": "text",
        ".text": "text",
        ".md": "markdown",
        ".markdown": "markdown",
        ".html": "html",
        ".htm": "html",
        ".pdf": "pdf",
        ".jsonl": "jsonl",
        ".ndjson": "jsonl",
    }


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("photo.png", None),
        ("README", None),
        ("archive.tar.gz", "application/octet-stream"),
        ("a.md", "application/pdf"),
        ("a.pdf", "text/plain"),
        ("a.html", "text/markdown"),
        ("a.txt", "text/html; charset=utf-8"),
    ],
)
def test_unsupported_format(filename: str, content_type: str | None) -> None:
    with pytest.raises(UnsupportedFormat) as error:
        load_file(b"some text", filename, content_type)
    check(error, "file", filename, ".md", ".pdf", ".jsonl")


@pytest.mark.parametrize(
    ("filename", "content_type"),
    [
        ("a.md", None),
        ("a.md", ""),
        ("a.md", "application/octet-stream"),
        ("a.md", "text/plain; charset=utf-8"),
        ("A.MARKDOWN", "Text/X-Markdown"),
        ("a.txt", "text/plain;charset=UTF-8"),
        ("a.html", "application/xhtml+xml"),
        ("a.jsonl", "application/x-ndjson"),
        ("a.ndjson", "application/json"),
    ],
)
def test_content_types_that_agree_with_the_extension(filename: str, content_type: str | None) -> None:
    data = b'{"text": "hello", "source": "s"}' if "json" in filename else b"hello"
    assert only(load_file(data, filename, content_type)).sections == (Section(None, ("hello",)),)


@pytest.mark.parametrize("filename", ["a.txt", "a.md", "a.html", "a.pdf", "a.jsonl"])
def test_empty_file(filename: str) -> None:
    with pytest.raises(DocumentError) as error:
        load_file(b"", filename)
    check(error, "file", filename, "empty")


@pytest.mark.parametrize("filename", ["a.txt", "a.md", "a.html", "a.jsonl"])
def test_whitespace_only_file(filename: str) -> None:
    with pytest.raises(DocumentError) as error:
        load_file(b"\xef\xbb\xbf \r\n\t\n", filename)
    check(error, "file", filename, "whitespace")


def test_markdown_with_only_headings_has_no_text() -> None:
    with pytest.raises(DocumentError) as error:
        load_file(b"# Title\n\n## Sub\n", "headings.md")
    check(error, "file", "headings.md", "no text")


@pytest.mark.parametrize(
    ("data", "words"),
    [
        ("caf\u00e9 cr\u00e8me".encode("latin-1"), ("UTF-8",)),
        ("hello".encode("utf-16"), ("UTF-8",)),
        ("hello".encode("utf-16-le"), ("NUL", "UTF-16")),
    ],
    ids=["latin-1", "utf-16-bom", "utf-16-no-bom"],
)
def test_text_must_be_utf8(data: bytes, words: tuple[str, ...]) -> None:
    with pytest.raises(DocumentError) as error:
        load_file(data, "legacy.txt")
    check(error, "file", "legacy.txt", *words)


def test_file_name_is_checked_as_a_source() -> None:
    with pytest.raises(DocumentError) as error:
        load_file(b"text", "bad\nname.txt")
    check(error, "file", "control characters")


# --- JSONL --------------------------------------------------------------------------------------


def jsonl(*records: object) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in records).encode()


def test_jsonl_gives_one_document_per_record() -> None:
    data = jsonl(
        {"text": "# FAQ\n\nPlain answer.", "category": "news", "rank": 2, "draft": False},
        "",
        {
            "text": "Second record.",
            "source": "kb/second",
            "title": "Second",
            "metadata": {"lang": "en", "score": 0.5},
            "expires_at": "2026-12-31T12:00:00+02:00",
        },
        {"text": "Third.", "expires_at": 1_800_000_000, "metadata": None},
    )
    first, second, third = load_file(data, "notes.jsonl", "application/jsonl")

    assert first == SourceDocument(
        "notes.jsonl#1",
        "FAQ",
        (Section("FAQ", ("Plain answer.",)),),
        {"category": "news", "rank": 2, "draft": False},
        None,
    )
    assert second.source == "kb/second"
    assert second.title == "Second"
    assert second.metadata == {"lang": "en", "score": 0.5}
    assert second.expires_at == datetime(2026, 12, 31, 10, 0, tzinfo=UTC)
    assert third.source == "notes.jsonl#4"
    assert third.metadata == {}
    assert third.expires_at == datetime.fromtimestamp(1_800_000_000, tz=UTC)


@pytest.mark.parametrize(
    ("records", "words"),
    [
        (({"text": "ok"}, '{"text": "unclosed'), ("line 2", "not valid JSON")),
        (({"text": "ok"}, "", "[1, 2]"), ("line 3", "object", "list")),
        (({"source": "a"},), ("line 1", "'text' is missing")),
        (({"text": ""},), ("line 1", "text is empty")),
        (({"text": "   \n "},), ("line 1", "text is empty")),
        (({"text": ["a"]},), ("line 1", "text must be a string")),
        (
            ({"text": "a", "source": "x"}, {"text": "b", "source": "y"}, {"text": "c", "source": "x"}),
            ("line 3", "'x'", "line 1"),
        ),
        (({"text": "a"}, {"text": "b", "source": "notes.jsonl#1"}), ("line 2", "already used")),
        (({"text": "a", "source": ""},), ("line 1", "source is empty")),
        (({"text": "a", "title": 3},), ("line 1", "title must be a string")),
        (({"text": "a", "page": 3},), ("line 1", "'page'", "reserved")),
        (({"text": "a", "tags": ["x", "y"]},), ("line 1", "'tags'", "a list")),
        (({"text": "a", "author": None},), ("line 1", "'author'", "null")),
        (({"text": "a", "metadata": "x"},), ("line 1", "metadata must be an object")),
        (({"text": "a", "metadata": {"lang": "en"}, "lang": "de"},), ("line 1", "'lang'", "both")),
        (({"text": "a", "expires_at": "next week"},), ("line 1", "expires_at", "next week")),
    ],
)
def test_jsonl_errors_name_the_line(records: tuple[object, ...], words: tuple[str, ...]) -> None:
    with pytest.raises(DocumentError) as error:
        load_file(jsonl(*records), "notes.jsonl")
    check(error, "file", "notes.jsonl", *words)


def test_jsonl_without_records() -> None:
    with pytest.raises(DocumentError) as error:
        load_file(b"\n\n", "notes.jsonl")
    check(error, "file", "notes.jsonl")


# --- validation shared by every path ------------------------------------------------------------


def test_text_document_normalises_and_carries_metadata_and_expiry() -> None:
    document = text_document(
        "  kb/refunds  ",
        "Line one\r\nline two.",
        metadata={"lang": "en", "count": 3, "ratio": 0.25, "public": True},
        expires_at="2026-12-31",
        param="documents[0]",
    )

    assert document == SourceDocument(
        "kb/refunds",
        None,
        (Section(None, ("Line one line two.",)),),
        {"lang": "en", "count": 3, "ratio": 0.25, "public": True},
        datetime(2026, 12, 31, tzinfo=UTC),
    )


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-12-31", datetime(2026, 12, 31, tzinfo=UTC)),
        ("2026-12-31T12:00:00Z", datetime(2026, 12, 31, 12, tzinfo=UTC)),
        ("2026-12-31T12:00:00+02:00", datetime(2026, 12, 31, 10, tzinfo=UTC)),
        (" 2026-12-31T12:00:00 ", datetime(2026, 12, 31, 12, tzinfo=UTC)),
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (1_798_761_600.5, datetime(2027, 1, 1, 0, 0, 0, 500_000, tzinfo=UTC)),
        (datetime(2026, 6, 1, 8, 0), datetime(2026, 6, 1, 8, 0, tzinfo=UTC)),
        (
            datetime(2026, 6, 1, 8, 0, tzinfo=timezone(timedelta(hours=-5))),
            datetime(2026, 6, 1, 13, tzinfo=UTC),
        ),
        (None, None),
    ],
)
def test_expires_at_parsing(value: str | float | datetime | None, expected: datetime | None) -> None:
    expires_at = text_document("a", "text", expires_at=value).expires_at

    assert expires_at == expected
    if expires_at is not None:
        assert expires_at.tzinfo is UTC


@pytest.mark.parametrize(
    "value", ["", "tomorrow", "2026-13-01", "31/12/2026", True, 1e300, float("nan"), [2026]]
)
def test_bad_expires_at(value: object) -> None:
    with pytest.raises(DocumentError) as error:
        text_document("a", "text", expires_at=value, param="documents[2]")  # type: ignore[arg-type]
    check(error, "documents[2].expires_at", "expires_at", "ISO 8601")


@pytest.mark.parametrize(
    ("source", "words"),
    [
        ("", ("empty",)),
        ("   ", ("empty",)),
        ("x" * 513, ("513", "512")),
        ("a\x00b", ("control",)),
        ("line\nbreak", ("control",)),
        ("del\x7f", ("control",)),
        (42, ("must be a string",)),
    ],
)
def test_bad_source(source: object, words: tuple[str, ...]) -> None:
    with pytest.raises(DocumentError) as error:
        text_document(source, "text", param="documents[2]")  # type: ignore[arg-type]
    check(error, "documents[2].source", "source", *words)


def test_longest_source_and_title_are_accepted() -> None:
    document = text_document("s" * 512, "text", title="t" * 512)
    assert (len(document.source), len(document.title or "")) == (512, 512)


def test_bad_title() -> None:
    with pytest.raises(DocumentError) as error:
        text_document("a", "text", title="t" * 513, param="documents[1]")
    check(error, "documents[1].title", "title", "512")


@pytest.mark.parametrize("key", sorted(RESERVED_METADATA_KEYS))
def test_reserved_metadata_keys(key: str) -> None:
    with pytest.raises(DocumentError) as error:
        text_document("a", "text", metadata={key: "x"}, param="documents[2]")
    check(error, "documents[2].metadata", repr(key), "reserved")


@pytest.mark.parametrize(
    ("metadata", "words"),
    [
        ({"tags": ["a", "b"]}, ("'tags'", "a list")),
        ({"author": {"name": "x"}}, ("'author'", "an object")),
        ({"author": None}, ("'author'", "null")),
        ({"score": float("nan")}, ("'score'", "finite")),
        ({"score": float("inf")}, ("'score'", "finite")),
        ({"big": 2**64}, ("'big'", "64-bit")),
        ({"note": "n" * 1025}, ("'note'", "1025", "1024")),
        ({"": "x"}, ("non-empty",)),
        ({"k" * 65: "x"}, ("65", "64")),
        ({"$and": 1}, ("'$and'",)),
        ({f"k{i}": i for i in range(33)}, ("33", "32")),
        ("not a mapping", ("must be an object",)),
    ],
)
def test_bad_metadata(metadata: object, words: tuple[str, ...]) -> None:
    with pytest.raises(DocumentError) as error:
        text_document("a", "text", metadata=metadata, param="documents[2]")  # type: ignore[arg-type]
    check(error, "documents[2].metadata", *words)


def test_metadata_at_the_limits_is_accepted() -> None:
    metadata: dict[str, object] = {f"k{i}": i for i in range(31)}
    metadata["k" * 64] = "v" * 1024
    assert text_document("a", "text", metadata=metadata).metadata == metadata


@pytest.mark.parametrize("text", ["", "  \n\t\n", "# Only a heading", 7])
def test_text_must_have_paragraphs(text: object) -> None:
    with pytest.raises(DocumentError) as error:
        text_document("a", text, param="documents[3]")  # type: ignore[arg-type]
    check(error, "documents[3].text", "text")
