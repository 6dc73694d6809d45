"""Markup to sections: Markdown and HTML read into paragraphs under heading paths.

Both build their sections the same way (:class:`Sections`): a heading closes the paragraphs
before it and opens a new path (``"Refunds > Exceptions"``); the first level-1 heading is
remembered as a title.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

from index.documents import Section, collapse_whitespace


class Sections:
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


def markdown_sections(text: str) -> tuple[tuple[Section, ...], str | None]:
    """Sections by ATX and setext headings; fenced code stays one paragraph, fences included."""
    if front_matter := _FRONT_MATTER.match(text):  # YAML metadata of static-site generators, not prose
        text = text[front_matter.end() :]
    out = Sections()
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


class HTMLText(HTMLParser):
    """Text of an HTML page as sections; the parser unescapes entities itself."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out = Sections()
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
