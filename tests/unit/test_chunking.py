"""Chunking: windows of at most ``size`` tokens with ``overlap``, cut at paragraph or sentence ends,
never across a section and never starting inside a word when that can be helped.

Most tests tokenize by whitespace (a token is a run of non-space characters) so that token counts
are plain to read; one uses glued word pieces, and one the real embedder's tokenizer."""

from __future__ import annotations

import itertools
import math
import re

import pytest

from index.chunking import Chunk, ChunkingPolicy, chunk_document
from index.documents import Section, SourceDocument
from index.embedder import load_embedder
from index.loaders import text_document


def words(text: str) -> list[tuple[int, int]]:
    """One token per whitespace-separated word."""
    return [match.span() for match in re.finditer(r"\S+", text)]


def glued(text: str) -> list[tuple[int, int]]:
    """Word pieces as a WordPiece tokenizer makes them: "tokenization" is "token" + "ization",
    two spans with no gap between them."""
    spans: list[tuple[int, int]] = []
    for match in re.finditer(r"\S+", text):
        start, end = match.span()
        if match.group().startswith("tokenization"):
            spans += [(start, start + 5), (start + 5, end)]
        else:
            spans.append((start, end))
    return spans


def four_char_pieces(text: str) -> list[tuple[int, int]]:
    """Every word cut into glued pieces of four characters."""
    spans: list[tuple[int, int]] = []
    for match in re.finditer(r"\S+", text):
        start, end = match.span()
        spans += [(offset, min(offset + 4, end)) for offset in range(start, end, 4)]
    return spans


def document(*sections: Section) -> SourceDocument:
    return SourceDocument("doc.md", None, tuple(sections), {}, None)


def plain(text: str) -> SourceDocument:
    return document(Section(None, (text,)))


def numbered(count: int, start: int = 0) -> list[str]:
    return [f"w{index}" for index in range(start, start + count)]


# --- sizes, overlap, positions ---------------------------------------------------------------------


def test_long_section_is_cut_into_overlapping_windows_of_at_most_size_tokens() -> None:
    policy = ChunkingPolicy(size=20, overlap=5)
    text = " ".join(numbered(100))  # no paragraph or sentence ends: every cut is a hard cut
    chunks = chunk_document(plain(text), words, policy)

    assert len(chunks) > 1
    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))
    for chunk in chunks:
        assert chunk.tokens == len(chunk.text.split()) <= policy.size
        assert chunk.heading is None
        assert chunk.page is None
    for before, after in itertools.pairwise(chunks):
        # The next window starts inside this one, ``overlap`` tokens before its end.
        assert after.text.split()[: policy.overlap] == before.text.split()[-policy.overlap :]
    # Nothing is lost: every word is in some chunk, and the last chunk ends the text.
    assert set(text.split()) == {word for chunk in chunks for word in chunk.text.split()}
    assert chunks[-1].text.endswith("w99")
    assert chunks[0].text.startswith("w0 ")


def test_short_section_is_one_chunk() -> None:
    chunks = chunk_document(plain("Refunds take five days."), words, ChunkingPolicy(size=16, overlap=4))
    assert chunks == [Chunk("Refunds take five days.", None, None, 0, 4)]


def test_a_section_of_exactly_size_tokens_is_one_chunk() -> None:
    text = " ".join(numbered(16))
    chunks = chunk_document(plain(text), words, ChunkingPolicy(size=16, overlap=4))
    assert [(chunk.text, chunk.tokens) for chunk in chunks] == [(text, 16)]


def test_a_section_without_tokens_gives_no_chunks() -> None:
    assert chunk_document(plain("   \n  "), words, ChunkingPolicy()) == []


def test_zero_overlap_partitions_the_tokens() -> None:
    text = " ".join(numbered(50))
    chunks = chunk_document(plain(text), words, ChunkingPolicy(size=16, overlap=0))
    assert [word for chunk in chunks for word in chunk.text.split()] == text.split()
    assert [chunk.tokens for chunk in chunks] == [16, 16, 16, 2]


# --- sections ---------------------------------------------------------------------------------------


def test_chunks_never_cross_sections_and_carry_the_heading_path() -> None:
    refunds = " ".join(f"refund{index}" for index in range(40))
    shipping = " ".join(f"ship{index}" for index in range(40))
    gifts = " ".join(f"gift{index}" for index in range(5))
    doc = text_document(
        "help.md",
        f"# Help\n\n## Refunds\n\n{refunds}\n\n## Shipping\n\n{shipping}\n\n### Gift cards\n\n{gifts}",
    )
    chunks = chunk_document(doc, words, ChunkingPolicy(size=16, overlap=4))

    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))
    expected = {"refund": "Help > Refunds", "ship": "Help > Shipping", "gift": "Help > Shipping > Gift cards"}
    for chunk in chunks:
        kinds = {re.sub(r"\d+", "", word) for word in chunk.text.split()}
        assert len(kinds) == 1, chunk.text  # one section's words only
        assert chunk.heading == expected[kinds.pop()]
    headings = [chunk.heading for chunk in chunks]
    assert headings[0] == "Help > Refunds"
    assert headings[-1] == "Help > Shipping > Gift cards"
    assert headings.count("Help > Shipping > Gift cards") == 1
    # In reading order: every Refunds chunk before every Shipping chunk.
    assert headings.index("Help > Shipping") > max(
        index for index, heading in enumerate(headings) if heading == "Help > Refunds"
    )
    # Every section is covered from its first word to its last.
    for section_text in (refunds, shipping, gifts):
        covered = {word for chunk in chunks for word in chunk.text.split()}
        assert set(section_text.split()) <= covered


def test_a_short_section_after_a_long_one_is_its_own_chunk() -> None:
    doc = document(
        Section("A", (" ".join(numbered(30)),)),
        Section("B", ("tail words only",)),
    )
    chunks = chunk_document(doc, words, ChunkingPolicy(size=16, overlap=4))
    assert chunks[-1] == Chunk("tail words only", "B", None, len(chunks) - 1, 3)
    assert all("tail" not in chunk.text for chunk in chunks[:-1])


def test_pdf_pages_are_carried_on_their_chunks() -> None:
    doc = document(
        Section(None, (" ".join(numbered(30)),), page=1),
        Section(None, (" ".join(numbered(3, start=100)),), page=3),
    )
    chunks = chunk_document(doc, words, ChunkingPolicy(size=16, overlap=4))
    assert [chunk.page for chunk in chunks] == [1] * (len(chunks) - 1) + [3]
    assert chunks[-1].text == "w100 w101 w102"
    assert all(chunk.heading is None for chunk in chunks)


def test_paragraphs_of_a_section_are_joined_by_blank_lines() -> None:
    doc = document(Section("H", ("First paragraph.", "Second paragraph.")))
    assert chunk_document(doc, words, ChunkingPolicy(size=16, overlap=4)) == [
        Chunk("First paragraph.\n\nSecond paragraph.", "H", None, 0, 4)
    ]


# --- where a window is cut ---------------------------------------------------------------------------


def test_cut_prefers_the_last_paragraph_break_in_the_second_half() -> None:
    # Window of 20 tokens: breaks after token 3 (first half) and after tokens 12 and 15 (second half).
    paragraphs = (
        " ".join(numbered(3)),
        " ".join(numbered(9, 3)),
        " ".join(numbered(3, 12)),
        " ".join(numbered(2, 15)) + ". " + " ".join(numbered(28, 17)),  # a later sentence end: not used
    )
    chunks = chunk_document(document(Section(None, paragraphs)), words, ChunkingPolicy(size=20, overlap=4))
    assert chunks[0].tokens == 15
    assert chunks[0].text.endswith("w14")
    assert chunks[1].text.split()[0] == "w11"  # 4 tokens of overlap


def test_a_paragraph_break_in_the_first_half_is_not_used() -> None:
    paragraphs = (" ".join(numbered(5)), " ".join(numbered(40, 5)))
    chunks = chunk_document(document(Section(None, paragraphs)), words, ChunkingPolicy(size=20, overlap=4))
    assert chunks[0].tokens == 20  # no sentence end either: a hard cut at the window's end
    assert chunks[0].text.split()[-1] == "w19"


def test_cut_falls_back_to_the_last_sentence_end_in_the_second_half() -> None:
    tokens = numbered(60)
    tokens[2] += "."  # first half: ignored
    tokens[12] += "?"  # second half
    tokens[15] += "."  # the last sentence end in the window: chosen
    chunks = chunk_document(plain(" ".join(tokens)), words, ChunkingPolicy(size=20, overlap=4))
    assert chunks[0].tokens == 16
    assert chunks[0].text.endswith("w15.")
    assert chunks[1].text.startswith("w12? ")


@pytest.mark.parametrize("mark", [".", "?", "!", ":", ";"])
def test_every_sentence_end_mark_counts(mark: str) -> None:
    tokens = numbered(40)
    tokens[13] += mark
    chunks = chunk_document(plain(" ".join(tokens)), words, ChunkingPolicy(size=20, overlap=4))
    assert chunks[0].text.endswith(f"w13{mark}")


def test_a_period_inside_a_token_is_not_a_sentence_end() -> None:
    tokens = numbered(40)
    tokens[13] = "example.com"  # ends a token, not with the mark
    tokens[14] = "v1.2"
    chunks = chunk_document(plain(" ".join(tokens)), words, ChunkingPolicy(size=20, overlap=4))
    assert chunks[0].tokens == 20


def test_cut_is_hard_when_there_is_no_break_or_sentence_end() -> None:
    chunks = chunk_document(plain(" ".join(numbered(45))), words, ChunkingPolicy(size=20, overlap=4))
    assert [chunk.tokens for chunk in chunks] == [20, 20, 13]


# --- word pieces -------------------------------------------------------------------------------------


def test_a_window_does_not_start_inside_a_glued_word() -> None:
    text = " ".join(f"tokenization{index}" if index % 2 else f"word{index}" for index in range(80))
    spans = glued(text)
    assert len(spans) > 80  # the glued pieces are there
    chunks = chunk_document(plain(text), glued, ChunkingPolicy(size=16, overlap=4))

    assert len(chunks) > 2
    for chunk in chunks:
        assert chunk.tokens <= 16
        assert not chunk.text.startswith("ization"), chunk.text
        assert chunk.text.split()[0] in text.split()  # a whole word
    # Every word is in some chunk, whole.
    assert set(text.split()) <= {word for chunk in chunks for word in chunk.text.split()}


def test_a_window_starts_on_a_glued_punctuation_token() -> None:
    # "(" glued to the word after it is not alphanumeric: a window may begin there.
    text = " ".join(f"({word})" for word in numbered(60))
    spans = [match.span() for match in re.finditer(r"[()]|\w+", text)]
    chunks = chunk_document(plain(text), lambda _: spans, ChunkingPolicy(size=16, overlap=4))
    assert all(chunk.text[0] in "()" for chunk in chunks)
    assert all(chunk.tokens <= 16 for chunk in chunks)


def test_a_glued_run_longer_than_the_window_terminates_and_covers_the_text() -> None:
    url = "https://example.com/" + "".join(f"{index:04d}" for index in range(245))  # 1000 characters
    text = f"See {url} for details."
    policy = ChunkingPolicy(size=16, overlap=4)
    chunks = chunk_document(plain(text), four_char_pieces, policy)

    assert chunks
    assert all(chunk.tokens <= policy.size for chunk in chunks)
    assert chunks[0].text.startswith("See https://")
    assert chunks[-1].text.endswith("for details.")
    # Together the chunks hold the whole text: each is a piece of it, in order, with no gap.
    covered = 0
    for chunk in chunks:
        start = text.find(chunk.text)
        assert 0 <= start <= covered
        covered = max(covered, start + len(chunk.text))
    assert covered == len(text)


def test_a_glued_run_longer_than_the_window_is_not_cut_one_token_at_a_time() -> None:
    # Where no word start can be found, the window should advance by size - overlap tokens as
    # everywhere else; advancing by one token makes ~one chunk per token (quadratic text).
    url = "https://example.com/" + "".join(f"{index:04d}" for index in range(245))
    policy = ChunkingPolicy(size=16, overlap=4)
    tokens = len(four_char_pieces(url))
    chunks = chunk_document(plain(url), four_char_pieces, policy)
    stride = policy.size - policy.overlap
    assert len(chunks) <= 2 * math.ceil(tokens / stride), (len(chunks), tokens)


# --- the policy --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("size", "overlap"), [(16, 0), (16, 7), (32, 15), (200, 32), (512, 255)])
def test_policy_accepts(size: int, overlap: int) -> None:
    assert ChunkingPolicy(size, overlap).size == size


@pytest.mark.parametrize(
    ("size", "overlap", "message"),
    [
        (15, 0, "at least 16"),
        (0, 0, "at least 16"),
        (16, 8, "half"),
        (32, 16, "half"),
        (32, 31, "half"),
        (32, 40, "half"),
        (32, -1, "at least 0"),
    ],
)
def test_policy_rejects(size: int, overlap: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ChunkingPolicy(size, overlap)


def test_default_policy() -> None:
    assert ChunkingPolicy() == ChunkingPolicy(size=200, overlap=32)


# --- the real tokenizer --------------------------------------------------------------------------------


ARTICLE = """\
# Returns handbook

## Refunds

Refunds are issued to the original payment method within five business days of the return arriving at
our warehouse. Items bought on sale can be returned for store credit only. Gift cards are never refunded,
and neither are downloadable products once the download link has been used. If a refund has not arrived
after ten business days, contact support with your order number (it starts with "ORD-" and has eight
digits) and we will trace the payment for you.

Internationalization note: customers outside the EU pay return postage themselves; within the EU it is
free. Counter-examples, hyphenated-words, e-mail addresses such as refunds@example.com and URLs like
https://example.com/help/returns?lang=en&region=eu#refunds all tokenize into many glued pieces.

## Shipping

Orders ship within two days. Express shipping arrives the next business day when ordered before 14:00.
""" + "\n\n".join(
    f"Paragraph {index}: the parcel tracking page updates every few hours, and carriers sometimes scan "
    f"parcels late, so a parcel may show as delayed while it is in fact on time."
    for index in range(12)
)


@pytest.mark.parametrize(("size", "overlap"), [(200, 32), (64, 8), (16, 4)])
def test_chunk_tokens_match_the_embedders_count(size: int, overlap: int) -> None:
    embedder = load_embedder()
    doc = text_document("handbook.md", ARTICLE)
    chunks = chunk_document(doc, embedder.split_tokens, ChunkingPolicy(size, overlap))

    assert len(chunks) > 1
    assert [chunk.position for chunk in chunks] == list(range(len(chunks)))
    assert {chunk.heading for chunk in chunks} == {
        "Returns handbook > Refunds",
        "Returns handbook > Shipping",
    }
    for chunk in chunks:
        counted = embedder.count_tokens(chunk.text)
        assert chunk.tokens <= size
        # Re-tokenizing a passage cut from its section may differ slightly at its edges.
        assert abs(counted - chunk.tokens) <= overlap, (counted, chunk.tokens, chunk.text)
        assert counted <= embedder.max_tokens
        assert chunk.text == chunk.text.strip()
        assert chunk.text
