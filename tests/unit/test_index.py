"""The index end to end, against a real chromadb (persistent, on disk) and the real embedder:
ingestion, the store's bookkeeping, dense, lexical and hybrid retrieval, expiry and durability."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from chromadb.api import ClientAPI

from index.chunking import ChunkingPolicy
from index.documents import Section, SourceDocument
from index.embedder import Embedder, load_embedder
from index.errors import CollectionNotFound, DocumentError, DocumentNotFound
from index.ingest import Ingestor, IngestResult
from index.lexical import LexicalIndex
from index.loaders import text_document
from index.retrieval import Mode, Passage, Retriever
from index.store import NEVER_EXPIRES, ChunkStore, persistent_client

ROOT = Path(__file__).resolve().parents[2]
MODES: tuple[Mode, ...] = ("dense", "lexical", "hybrid")

HELP_CENTRE = {
    "refunds.md": "# Refund policy\n\nCustomers may return purchased items within 30 days and receive "
    "their money back on the card they paid with.",
    "shipping.md": "# Shipping times\n\nStandard parcels are delivered within three to five business "
    "days; express delivery arrives the next day.",
    "password.md": "# Password reset\n\nTo reset a forgotten password, choose 'Forgot password' on the "
    "sign-in page and follow the link we email to you.",
    "router.md": "# Home networking\n\nThe ZX-4471 supports mesh networking and WPA3 encryption out of "
    "the box.",
    "warranty.md": "# Warranty\n\nHardware is covered by a two-year warranty against manufacturing defects.",
    "hours.md": "# Opening hours\n\nOur stores open at 9 am and close at 6 pm, Monday to Saturday.",
}


def help_centre(*sources: str) -> list[SourceDocument]:
    return [text_document(source, HELP_CENTRE[source]) for source in sources or HELP_CENTRE]


def long_document(source: str, word: str, paragraphs: int = 8) -> SourceDocument:
    """A document of several chunks (under a 32-token policy) about ``word``."""
    text = "\n\n".join(
        f"Paragraph {index} about the {word}: the {word} is described here in some detail, so that "
        f"this passage needs more than one chunk of thirty-two tokens to hold it."
        for index in range(paragraphs)
    )
    return text_document(source, f"# {word.title()} notes\n\n{text}")


def sources(passages: list[Passage]) -> list[str]:
    return [passage.source for passage in passages]


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    return load_embedder()


@pytest.fixture
def client(tmp_path: Path) -> ClientAPI:
    return persistent_client(str(tmp_path / "index"))


@pytest.fixture
def store(client: ClientAPI, embedder: Embedder) -> ChunkStore:
    return ChunkStore(client, embedder=embedder.name)


@pytest.fixture
def ingestor(store: ChunkStore, embedder: Embedder) -> Ingestor:
    return Ingestor(store, embedder, ChunkingPolicy(size=32, overlap=4))


@pytest.fixture
def retriever(store: ChunkStore, embedder: Embedder) -> Retriever:
    return Retriever(store, embedder)


@pytest.fixture(scope="module")
def library(tmp_path_factory: pytest.TempPathFactory, embedder: Embedder) -> tuple[ChunkStore, Retriever]:
    """The help centre in collection "help", read by the tests that do not write."""
    store = ChunkStore(
        persistent_client(str(tmp_path_factory.mktemp("library") / "index")), embedder=embedder.name
    )
    Ingestor(store, embedder).ingest("help", help_centre())
    return store, Retriever(store, embedder)


# --- ingest and retrieve -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "source"),
    [
        ("How do I get my money back for something I bought?", "refunds.md"),
        ("How long will it take for my order to arrive?", "shipping.md"),
        ("I can't remember my login credentials, what now?", "password.md"),
        ("What time do the shops close?", "hours.md"),
        ("My device broke after a year, is it still guaranteed?", "warranty.md"),
    ],
)
@pytest.mark.parametrize("mode", ["dense", "hybrid"])
def test_a_paraphrased_question_finds_its_document(
    library: tuple[ChunkStore, Retriever], question: str, source: str, mode: Mode
) -> None:
    _, retriever = library
    passages = retriever.retrieve(question, 3, mode=mode)
    assert sources(passages)[0] == source, [(p.source, p.score) for p in passages]
    assert 0 < passages[0].score <= 1


def test_a_passage_carries_what_the_context_block_needs(
    library: tuple[ChunkStore, Retriever], embedder: Embedder
) -> None:
    _, retriever = library
    question = "Can I return an item and get a refund?"
    passage = retriever.retrieve(question, 1, mode="dense")[0]

    assert passage.collection == "help"
    assert passage.source == "refunds.md"
    assert passage.title == "Refund policy"  # the first '#' heading
    assert passage.heading == "Refund policy"
    assert passage.page is None
    assert passage.text == HELP_CENTRE["refunds.md"].split("\n\n", 1)[1]
    assert passage.volatile is False
    assert passage.id.endswith("-00000")
    # The score is the cosine similarity of the query to what was embedded (heading + text).
    query, stored = embedder.embed([question, f"{passage.heading}\n\n{passage.text}"])
    assert passage.score == pytest.approx(float(query @ stored), abs=1e-4)
    assert 0 < passage.score <= 1


def test_dense_passages_are_ordered_by_score(library: tuple[ChunkStore, Retriever]) -> None:
    _, retriever = library
    passages = retriever.retrieve("parcel delivery", 6, mode="dense")
    assert len(passages) == 6
    scores = [passage.score for passage in passages]
    assert scores == sorted(scores, reverse=True)
    assert all(-1 <= score <= 1 for score in scores)
    assert len(retriever.retrieve("parcel delivery", 2, mode="dense")) == 2


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_finds_an_exact_product_code(library: tuple[ChunkStore, Retriever], mode: Mode) -> None:
    _, retriever = library
    passages = retriever.retrieve("ZX-4471", 6, mode=mode)
    assert "router.md" in sources(passages)
    if mode == "lexical":
        # Only one document holds the code: BM25 scores no other above zero.
        assert sources(passages) == ["router.md"]
    if mode == "hybrid":
        assert sources(passages)[0] == "router.md"
    assert all(passage.collection == "help" for passage in passages)


def test_hybrid_holds_the_best_of_both_rankings(library: tuple[ChunkStore, Retriever]) -> None:
    _, retriever = library
    question = "Which product has WPA3 encryption, and how fast is express delivery?"
    dense = retriever.retrieve(question, 3, mode="dense")
    lexical = retriever.retrieve(question, 3, mode="lexical")
    hybrid = retriever.retrieve(question, 3, mode="hybrid")
    assert dense
    assert lexical
    assert len(hybrid) == 3
    keys = {(passage.collection, passage.id) for passage in hybrid}
    assert (dense[0].collection, dense[0].id) in keys
    assert (lexical[0].collection, lexical[0].id) in keys
    assert len(keys) == 3  # fused, not duplicated
    # Every fused passage comes from one of the two rankings.
    assert keys <= {(p.collection, p.id) for p in retriever.retrieve(question, 20, mode="dense")} | {
        (p.collection, p.id) for p in retriever.retrieve(question, 20, mode="lexical")
    }


def test_lexical_search_without_a_known_word_finds_nothing(library: tuple[ChunkStore, Retriever]) -> None:
    _, retriever = library
    assert retriever.retrieve("xylophone quartet", 5, mode="lexical") == []
    assert retriever.retrieve("the and of", 5, mode="lexical") == []  # stop words only
    assert len(retriever.retrieve("xylophone quartet", 5, mode="hybrid")) == 5  # dense still answers


def test_unknown_collections_are_skipped(library: tuple[ChunkStore, Retriever]) -> None:
    _, retriever = library
    for mode in MODES:
        assert retriever.retrieve("money back", 3, collections=["nothing-here"], mode=mode) == []
        assert sources(
            retriever.retrieve("money back", 1, collections=["nothing-here", "help"], mode=mode)
        ) == ["refunds.md"]


# --- the store's bookkeeping ------------------------------------------------------------------------


def test_ingest_reports_and_info_counts(ingestor: Ingestor, store: ChunkStore) -> None:
    documents = [*help_centre("refunds.md", "hours.md"), long_document("walrus.md", "walrus")]
    result = ingestor.ingest("notes", documents)

    walrus_chunks = len(store.chunk_ids("notes", "walrus.md"))
    assert walrus_chunks > 1
    assert result == IngestResult(documents=3, chunks=2 + walrus_chunks, unchanged=0, tokens=result.tokens)
    assert result.tokens > 0
    info = store.info("notes")
    assert (info.name, info.chunks, info.documents) == ("notes", 2 + walrus_chunks, 3)
    assert info.embedder == "all-MiniLM-L6-v2"
    assert info.volatile is False
    assert info.expiring is False
    assert info.revision
    assert store.collection_names() == ["notes"]


def test_ingesting_the_same_documents_again_changes_nothing(ingestor: Ingestor, store: ChunkStore) -> None:
    documents = [*help_centre(), long_document("walrus.md", "walrus")]
    first = ingestor.ingest("notes", documents)
    ids = {document.source: store.chunk_ids("notes", document.source) for document in documents}
    before = store.info("notes")

    again = ingestor.ingest("notes", documents)

    assert again == IngestResult(
        documents=len(documents), chunks=first.chunks, unchanged=len(documents), tokens=0
    )
    assert {document.source: store.chunk_ids("notes", document.source) for document in documents} == ids
    after = store.info("notes")
    assert (
        (after.chunks, after.documents) == (before.chunks, before.documents) == (first.chunks, len(documents))
    )
    assert after.revision == before.revision  # nothing was written


def test_a_changed_document_replaces_all_its_old_chunks(
    ingestor: Ingestor, store: ChunkStore, embedder: Embedder
) -> None:
    ingestor.ingest("notes", [long_document("animal.md", "walrus"), *help_centre("hours.md")])
    old_ids = store.chunk_ids("notes", "animal.md")
    hours_ids = store.chunk_ids("notes", "hours.md")
    assert len(old_ids) > 1

    result = ingestor.ingest("notes", [long_document("animal.md", "penguin", paragraphs=3)])

    new_ids = store.chunk_ids("notes", "animal.md")
    assert result.unchanged == 0
    assert result.chunks == len(new_ids)
    assert new_ids
    assert not new_ids & old_ids
    assert store.chunk_ids("notes", "hours.md") == hours_ids  # other documents untouched
    assert store.info("notes").chunks == len(new_ids) + len(hours_ids)
    for mode in MODES:
        passages = Retriever(store, embedder).retrieve("walrus", 10, mode=mode)
        assert all("walrus" not in passage.text.lower() for passage in passages), mode
    assert "penguin" in Retriever(store, embedder).retrieve("walrus", 1, mode="dense")[0].text


def test_a_new_title_or_metadata_is_a_new_version(ingestor: Ingestor, store: ChunkStore) -> None:
    text = HELP_CENTRE["refunds.md"]
    ingestor.ingest("notes", [text_document("refunds.md", text)])
    first = store.chunk_ids("notes", "refunds.md")
    ingestor.ingest("notes", [text_document("refunds.md", text, title="Returns")])
    second = store.chunk_ids("notes", "refunds.md")
    ingestor.ingest("notes", [text_document("refunds.md", text, title="Returns", metadata={"team": "care"})])
    third = store.chunk_ids("notes", "refunds.md")
    assert len(first) == len(second) == len(third) == 1
    assert len(first | second | third) == 3
    assert store.info("notes").chunks == 1


def test_ingest_records_the_clock_and_user_metadata(store: ChunkStore, embedder: Embedder) -> None:
    ingestor = Ingestor(store, embedder, clock=lambda: 1_700_000_000.0)
    document = text_document("refunds.md", HELP_CENTRE["refunds.md"], metadata={"team": "care", "tier": 2})
    ingestor.ingest("notes", [document])
    ids = sorted(store.chunk_ids("notes", "refunds.md"))
    (match,) = store.fetch("notes", ids, embedder.embed(["refund"])[0])
    assert match.metadata["ingested_at"] == 1_700_000_000.0
    assert match.metadata["expires_at"] == NEVER_EXPIRES
    assert match.metadata["team"] == "care"
    assert match.metadata["tier"] == 2
    assert match.metadata["source"] == "refunds.md"
    assert match.metadata["position"] == 0
    assert match.metadata["chunks"] == 1


def test_a_pdf_page_reaches_the_passage(ingestor: Ingestor, retriever: Retriever) -> None:
    pdf = SourceDocument(
        "manual.pdf",
        "Router manual",
        (
            Section(None, ("Unpack the router and plug it in.",), page=1),
            Section(None, ("Hold the reset button for ten seconds to restore factory settings.",), page=2),
        ),
        {},
        None,
    )
    ingestor.ingest("manuals", [pdf])
    passage = retriever.retrieve("how do I factory reset it", 1, mode="dense")[0]
    assert (passage.source, passage.title, passage.heading, passage.page) == (
        "manual.pdf",
        "Router manual",
        None,
        2,
    )


def test_delete_document_removes_every_chunk_of_its_source(
    ingestor: Ingestor, store: ChunkStore, retriever: Retriever
) -> None:
    ingestor.ingest("notes", [long_document("walrus.md", "walrus"), *help_centre("hours.md")])
    count = len(store.chunk_ids("notes", "walrus.md"))
    assert count > 1

    assert ingestor.delete_document("notes", "walrus.md") == count

    assert store.chunk_ids("notes", "walrus.md") == set()
    assert (store.info("notes").chunks, store.info("notes").documents) == (1, 1)
    for mode in MODES:
        assert "walrus.md" not in sources(retriever.retrieve("walrus", 10, mode=mode))
    with pytest.raises(DocumentNotFound) as missing:
        ingestor.delete_document("notes", "walrus.md")
    assert (missing.value.collection, missing.value.source) == ("notes", "walrus.md")
    with pytest.raises(CollectionNotFound) as no_collection:
        ingestor.delete_document("elsewhere", "hours.md")
    assert no_collection.value.name == "elsewhere"


def test_the_last_document_deleted_leaves_an_empty_searchable_collection(
    ingestor: Ingestor, store: ChunkStore, retriever: Retriever
) -> None:
    ingestor.ingest("notes", help_centre("hours.md"))
    assert retriever.retrieve("opening hours", 3, mode="hybrid")  # the lexical index is built
    ingestor.delete_document("notes", "hours.md")
    assert (store.info("notes").chunks, store.info("notes").documents) == (0, 0)
    for mode in MODES:
        assert retriever.retrieve("opening hours", 3, mode=mode) == []


def test_delete_collection(ingestor: Ingestor, store: ChunkStore, retriever: Retriever) -> None:
    ingestor.ingest("notes", help_centre("hours.md"))
    ingestor.ingest("other", help_centre("refunds.md"))
    ingestor.delete_collection("notes")

    assert store.collection_names() == ["other"]
    with pytest.raises(CollectionNotFound):
        store.info("notes")
    assert retriever.retrieve("opening hours", 3, collections=["notes"]) == []
    assert sources(retriever.retrieve("opening hours", 3)) == ["refunds.md"]
    with pytest.raises(CollectionNotFound) as missing:
        ingestor.delete_collection("notes")
    assert missing.value.name == "notes"


# --- failed requests write nothing ------------------------------------------------------------------------


def test_duplicate_sources_write_nothing(ingestor: Ingestor, store: ChunkStore) -> None:
    documents = [*help_centre("refunds.md", "hours.md"), text_document("refunds.md", "Another text.")]
    with pytest.raises(DocumentError) as error:
        ingestor.ingest("notes", documents)
    assert error.value.param == "documents"
    assert "refunds.md" in error.value.message
    assert store.collection_names() == []
    with pytest.raises(CollectionNotFound):
        store.info("notes")


def test_a_document_without_text_fails_the_request_before_any_write(
    ingestor: Ingestor, store: ChunkStore
) -> None:
    ingestor.ingest("notes", help_centre("hours.md"))
    before = store.info("notes")
    empty = SourceDocument("empty.md", None, (Section(None, ("   ",)),), {}, None)
    with pytest.raises(DocumentError) as error:
        ingestor.ingest("notes", [*help_centre("refunds.md"), empty])
    assert error.value.param == "documents"
    assert "empty.md" in error.value.message
    with pytest.raises(DocumentError):
        ingestor.ingest("fresh", [*help_centre("refunds.md"), empty])
    after = store.info("notes")
    assert (after.chunks, after.documents, after.revision) == (
        before.chunks,
        before.documents,
        before.revision,
    )
    assert store.collection_names() == ["notes"]


def test_no_documents_is_an_error(ingestor: Ingestor, store: ChunkStore) -> None:
    with pytest.raises(DocumentError) as error:
        ingestor.ingest("notes", [])
    assert error.value.param == "documents"
    assert store.collection_names() == []


# --- collection flags --------------------------------------------------------------------------------------


def test_volatile_is_set_at_creation_kept_when_omitted_and_changed_when_given(
    ingestor: Ingestor, store: ChunkStore, retriever: Retriever
) -> None:
    ingestor.ingest("news", help_centre("hours.md"), volatile=True)
    assert store.info("news").volatile is True
    assert retriever.retrieve("opening hours", 1)[0].volatile is True

    ingestor.ingest("news", help_centre("refunds.md"))
    assert store.info("news").volatile is True

    ingestor.ingest("news", help_centre("refunds.md"), volatile=False)  # unchanged documents, new flag
    assert store.info("news").volatile is False
    assert retriever.retrieve("opening hours", 1)[0].volatile is False
    assert store.info("news").documents == 2

    ingestor.ingest("plain", help_centre("hours.md"))
    assert store.info("plain").volatile is False


def test_a_store_with_another_embedder_refuses_an_existing_collection(
    ingestor: Ingestor, client: ClientAPI, store: ChunkStore, embedder: Embedder
) -> None:
    ingestor.ingest("notes", help_centre("hours.md"))
    before = store.info("notes")
    other = Ingestor(ChunkStore(client, embedder="another-model"), embedder)

    for documents in (help_centre("refunds.md"), help_centre("hours.md")):  # new and unchanged
        with pytest.raises(DocumentError) as error:
            other.ingest("notes", documents)
        assert error.value.param == "name"
        assert "all-MiniLM-L6-v2" in error.value.message
        assert "another-model" in error.value.message

    after = store.info("notes")
    assert (after.chunks, after.documents, after.revision, after.embedder) == (
        before.chunks,
        before.documents,
        before.revision,
        "all-MiniLM-L6-v2",
    )
    other.ingest("theirs", help_centre("refunds.md"))  # a new collection is theirs to create
    assert store.describe("theirs").embedder == "another-model"


INVALID_NAMES = ["ab", "-abc", "abc-", "_abc", "a b c", "x" * 64, "ünïcode", "abc/def", "", "abc\n"]


@pytest.mark.parametrize("name", INVALID_NAMES)
def test_invalid_collection_names_are_document_errors(
    ingestor: Ingestor, store: ChunkStore, name: str
) -> None:
    with pytest.raises(DocumentError) as error:
        ingestor.ingest(name, help_centre("hours.md"))
    assert error.value.param == "name"
    with pytest.raises(DocumentError):
        store.info(name)
    with pytest.raises(DocumentError):
        store.delete_collection(name)
    assert store.collection_names() == []


@pytest.mark.parametrize("name", ["a..b", "docs..v2", "10.0.0.1", "192.168.1.254"])
def test_names_chroma_refuses_are_document_errors_too(
    ingestor: Ingestor, store: ChunkStore, name: str
) -> None:
    # These pass the gateway's pattern, but chromadb refuses two consecutive periods and IPv4
    # addresses: the operator must get a 400 naming "name", not a 503 "the vector store failed".
    with pytest.raises(DocumentError) as error:
        ingestor.ingest(name, help_centre("hours.md"))
    assert error.value.param == "name"
    assert store.collection_names() == []


def test_longest_and_shortest_valid_names(ingestor: Ingestor, store: ChunkStore) -> None:
    names = ["abc", "a" * 63, "v1.2_docs-x"]
    for name in names:
        ingestor.ingest(name, help_centre("hours.md"))
    assert store.collection_names() == sorted(names)


# --- expiry ------------------------------------------------------------------------------------------------

T0 = datetime(2031, 1, 1, tzinfo=UTC).timestamp()


def sales() -> list[SourceDocument]:
    return [
        text_document(
            "spring.md", "# Spring sale\n\nSpring sale: headphones are half price.", expires_at=T0 + 100
        ),
        text_document(
            "summer.md", "# Summer sale\n\nSummer sale: headphones are a third off.", expires_at=T0 + 10_000
        ),
        text_document("catalog.md", "# Catalog\n\nWe sell headphones, speakers and cables."),
    ]


def at(moment: float) -> Callable[[], float]:
    return lambda: moment


@pytest.mark.parametrize("mode", MODES)
def test_expired_documents_are_not_returned(store: ChunkStore, embedder: Embedder, mode: Mode) -> None:
    Ingestor(store, embedder, clock=at(T0)).ingest("sales", sales())
    assert store.info("sales").expiring is True

    before = Retriever(store, embedder, clock=at(T0 + 50)).retrieve("spring sale headphones", 10, mode=mode)
    after = Retriever(store, embedder, clock=at(T0 + 1000)).retrieve("spring sale headphones", 10, mode=mode)
    later = Retriever(store, embedder, clock=at(T0 + 20_000)).retrieve(
        "spring sale headphones", 10, mode=mode
    )

    assert "spring.md" in sources(before)
    assert "summer.md" in sources(before)
    assert "spring.md" not in sources(after)
    assert "summer.md" in sources(after)
    assert sources(later) == ["catalog.md"]  # never expires
    if mode == "lexical":
        assert sources(before)[0] == "spring.md"


def test_expiry_at_exactly_now_is_expired(store: ChunkStore, embedder: Embedder) -> None:
    Ingestor(store, embedder).ingest("sales", sales())
    for mode in MODES:
        passages = Retriever(store, embedder, clock=at(T0 + 100)).retrieve("spring sale", 10, mode=mode)
        assert "spring.md" not in sources(passages), mode


def test_an_expiring_document_added_later_marks_the_collection(
    ingestor: Ingestor, store: ChunkStore, embedder: Embedder
) -> None:
    ingestor.ingest("sales", help_centre("hours.md"))
    assert store.info("sales").expiring is False
    ingestor.ingest("sales", sales()[:1])
    assert store.info("sales").expiring is True
    ingestor.ingest("sales", help_centre("refunds.md"))
    assert store.info("sales").expiring is True  # kept
    passages = Retriever(store, embedder, clock=at(T0 + 1000)).retrieve("spring sale", 10, mode="dense")
    assert "spring.md" not in sources(passages)


def test_delete_expired(store: ChunkStore, embedder: Embedder) -> None:
    Ingestor(store, embedder).ingest("sales", sales())
    assert store.delete_expired("sales", T0 + 1000) == 1
    assert store.chunk_ids("sales", "spring.md") == set()
    assert store.info("sales").documents == 2
    assert store.delete_expired("sales", T0 + 1000) == 0


# --- durability ------------------------------------------------------------------------------------------

_READER = """
import json, sys
from index.store import persistent_client
collection = persistent_client(sys.argv[1]).get_collection(sys.argv[2])
kept = collection.get(where={"source": sys.argv[3]}, include=["documents", "embeddings"])
deleted = collection.get(where={"source": sys.argv[4]}, include=[])
nearest = collection.query(query_embeddings=[list(kept["embeddings"][0])], n_results=1, include=[])
print(json.dumps({
    "count": collection.count(),
    "kept": sorted(kept["ids"]),
    "documents": kept["documents"],
    "deleted": deleted["ids"],
    "nearest": nearest["ids"][0],
}))
"""


def test_acknowledged_writes_are_seen_by_a_new_process(
    ingestor: Ingestor, store: ChunkStore, embedder: Embedder, tmp_path: Path
) -> None:
    ingestor.ingest("notes", [*help_centre("hours.md"), long_document("walrus.md", "walrus")])
    ingestor.ingest("notes", [long_document("penguin.md", "penguin")])
    ingestor.delete_document("notes", "penguin.md")  # a delete must be durable too
    ids = sorted(store.chunk_ids("notes", "walrus.md"))
    texts = sorted(match.text for match in store.fetch("notes", ids, embedder.embed(["walrus"])[0]))
    count = store.info("notes").chunks
    assert count == len(ids) + 1

    # A brand-new interpreter: nothing is shared with this process but the directory.
    completed = subprocess.run(
        [sys.executable, "-c", _READER, str(tmp_path / "index"), "notes", "walrus.md", "penguin.md"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    seen = json.loads(completed.stdout.strip().splitlines()[-1])
    assert seen["count"] == count
    assert seen["kept"] == ids
    assert sorted(seen["documents"]) == texts
    assert seen["deleted"] == []
    assert seen["nearest"] == [ids[0]]  # the vector index is there too, not only the rows


# --- the lexical index --------------------------------------------------------------------------------------


class GatedStore(ChunkStore):
    """A store whose corpus reads wait for ``gate``: holds a lexical rebuild half way."""

    def __init__(self, client: ClientAPI, *, embedder: str) -> None:
        super().__init__(client, embedder=embedder)
        self.gate = threading.Event()
        self.gate.set()

    def corpus(self, name: str, page: int = 10_000) -> Iterator[tuple[list[str], list[str]]]:
        assert self.gate.wait(timeout=30)
        yield from super().corpus(name, page)


def eventually(check: Callable[[], bool], seconds: float = 15.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within the time allowed"
        time.sleep(0.05)


@pytest.fixture
def gated(client: ClientAPI, embedder: Embedder) -> Iterator[GatedStore]:
    store = GatedStore(client, embedder=embedder.name)
    yield store
    store.gate.set()  # let any rebuild still waiting finish


def test_the_lexical_index_catches_up_with_writes_in_the_background(
    gated: GatedStore, embedder: Embedder
) -> None:
    ingestor = Ingestor(gated, embedder)
    retriever = Retriever(gated, embedder, mode="lexical")
    ingestor.ingest("help", help_centre())
    assert sources(retriever.retrieve("ZX-4471", 5)) == ["router.md"]  # the first build blocks

    gated.gate.clear()
    ingestor.ingest("help", [text_document("camera.md", "# Cameras\n\nThe QV-9182 camera records 4K video.")])
    started = time.monotonic()
    stale = retriever.retrieve("QV-9182 camera", 5)
    assert time.monotonic() - started < 15  # served from the previous index, not waiting for the rebuild
    assert "camera.md" not in sources(stale)
    assert sources(retriever.retrieve("ZX-4471", 5)) == ["router.md"]

    gated.gate.set()
    eventually(lambda: sources(retriever.retrieve("QV-9182 camera", 5)) == ["camera.md"])


def test_deleted_chunks_never_come_back_from_a_stale_lexical_index(
    gated: GatedStore, embedder: Embedder
) -> None:
    ingestor = Ingestor(gated, embedder)
    lexical = LexicalIndex()
    retriever = Retriever(gated, embedder, lexical)
    ingestor.ingest("help", help_centre())
    (router_id,) = gated.chunk_ids("help", "router.md")
    assert sources(retriever.retrieve("ZX-4471", 5, mode="lexical")) == ["router.md"]

    def raw_hits() -> list[str]:
        revision = gated.describe("help").revision
        corpus = lambda: gated.corpus("help")  # noqa: E731
        return [chunk_id for chunk_id, _ in lexical.search("help", revision, corpus, "ZX-4471", 5)]

    gated.gate.clear()
    ingestor.delete_document("help", "router.md")
    assert raw_hits() == [router_id]  # the index still holds the deleted chunk
    for mode in MODES:
        assert "router.md" not in sources(retriever.retrieve("ZX-4471", 5, mode=mode)), mode

    gated.gate.set()
    eventually(lambda: raw_hits() == [])
    for mode in MODES:
        assert "router.md" not in sources(retriever.retrieve("ZX-4471", 5, mode=mode)), mode


# --- several collections -----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_the_same_document_in_two_collections_is_returned_from_each(
    ingestor: Ingestor, retriever: Retriever, mode: Mode
) -> None:
    ingestor.ingest("alpha", help_centre("refunds.md", "hours.md"))
    ingestor.ingest("beta", help_centre("refunds.md", "shipping.md"))

    passages = retriever.retrieve("refund money back", 10, mode=mode)
    refunds = [passage for passage in passages if passage.source == "refunds.md"]
    assert sorted(passage.collection for passage in refunds) == ["alpha", "beta"]
    assert refunds[0].id == refunds[1].id  # same content, same id: told apart by collection
    assert refunds[0].text == refunds[1].text
    assert sorted(sources(passages[:2])) == ["refunds.md", "refunds.md"]

    only_beta = retriever.retrieve("refund money back", 10, collections=["beta"], mode=mode)
    assert {passage.collection for passage in only_beta} == {"beta"}
    assert sources(only_beta)[0] == "refunds.md"


def test_warm_up_builds_the_lexical_index_before_the_first_query(
    gated: GatedStore, embedder: Embedder
) -> None:
    Ingestor(gated, embedder).ingest("help", help_centre())
    retriever = Retriever(gated, embedder, LexicalIndex())
    retriever.warm_up()
    # With the corpus closed off, a query can only be answered from what warm-up built.
    gated.gate.clear()
    found = retriever.retrieve("ZX-4471", 3, mode="lexical")
    assert found, "the lexical index was not built by the warm-up"
