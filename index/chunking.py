"""Chunking by the embedder's tokens, with overlap, never across a heading.

A section (the text under one heading, or one PDF page) is cut into windows of at most
``size`` tokens. A window ends at the last paragraph break in its second half, else at the last
sentence end there, else where the tokens run out; the next window starts ``overlap`` tokens
earlier, moved back to the start of a word, so no passage loses the sentence it needs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from index.documents import SourceDocument

TokenSpans = Callable[[str], list[tuple[int, int]]]

_SENTENCE_ENDS = (".", "?", "!", ":", ";")


@dataclass(frozen=True)
class Chunk:
    """One passage of a document: what is embedded, stored and shown to the model."""

    text: str
    heading: str | None
    page: int | None
    position: int
    tokens: int


@dataclass(frozen=True)
class ChunkingPolicy:
    size: int = 200
    overlap: int = 32

    def __post_init__(self) -> None:
        if self.size < 16:
            raise ValueError("chunk size must be at least 16 tokens")
        if self.overlap < 0 or 2 * self.overlap >= self.size:
            raise ValueError("chunk overlap must be at least 0 and under half the chunk size")


def searchable_text(text: str, heading: str | None, title: str | None) -> str:
    """What is embedded and indexed lexically for a passage: led by its heading path (or, under
    none, its document's title), which says what the passage is about when it does not."""
    context = heading or title
    return f"{context}\n\n{text}" if context else text


def chunk_document(document: SourceDocument, spans_of: TokenSpans, policy: ChunkingPolicy) -> list[Chunk]:
    """Every chunk of ``document``, positions numbered from 0 in reading order."""
    chunks: list[Chunk] = []
    for section in document.sections:
        text = "\n\n".join(section.paragraphs)
        for passage, tokens in _windows(text, spans_of(text), policy):
            chunks.append(Chunk(passage, section.heading, section.page, len(chunks), tokens))
    return chunks


def _windows(text: str, spans: list[tuple[int, int]], policy: ChunkingPolicy) -> list[tuple[str, int]]:
    if not spans:
        return []
    windows: list[tuple[str, int]] = []
    start = 0
    while True:
        end = len(spans) if len(spans) - start <= policy.size else _cut(text, spans, start, policy.size)
        windows.append((text[spans[start][0] : spans[end - 1][1]].strip(), end - start))
        if end >= len(spans):
            return windows
        following = _word_start(text, spans, end - policy.overlap)
        # No word start after this window's own start (one glued run, a URL or a blob): take
        # the overlap as it falls rather than creep forward one token at a time.
        start = following if following > start else end - policy.overlap


def _cut(text: str, spans: list[tuple[int, int]], start: int, size: int) -> int:
    """Index one past the window's last token."""
    limit = start + size
    floor = start + size // 2
    sentence_end: int | None = None
    for index in range(limit, floor, -1):
        gap = text[spans[index - 1][1] : spans[index][0]]
        if "\n\n" in gap:
            return index
        if sentence_end is None and gap and text[spans[index - 1][1] - 1] in _SENTENCE_ENDS:
            sentence_end = index
    return sentence_end if sentence_end is not None else limit


def _word_start(text: str, spans: list[tuple[int, int]], index: int) -> int:
    # A word piece glued to the previous token ("##ing") is not where a passage should begin.
    while index > 0 and spans[index][0] == spans[index - 1][1] and text[spans[index][0]].isalnum():
        index -= 1
    return index
