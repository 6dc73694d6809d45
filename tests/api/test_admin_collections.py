"""Collections of documents through the admin API, over the real embedder and a real chromadb
under the test's data directory: JSON and multipart ingestion (every supported format),
idempotent re-ingestion, replacement, volatility, expiry, deletion, and every refusal, which
must leave the index as it was."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from service.settings import Settings
from tests.api.admin_support import TOKEN, assert_admin_error, running_gateway
from tests.api.conftest import CHAT, assert_error, chat_body, make_settings
from tests.fakes import FakeEngine
from tests.unit.test_loaders import make_pdf

AUTH = {"Authorization": f"Bearer {TOKEN}"}
COLLECTIONS = "/admin/collections"

REFUNDS = "Refunds are paid back to the original card within fourteen days of the returned parcel arriving."
SHIPPING = "Standard shipping takes three to five working days; express delivery arrives the next day."
PASSWORDS = "Passwords must be rotated every ninety days and may not reuse the last five passwords."


def documents_path(collection: str) -> str:
    return f"{COLLECTIONS}/{collection}/documents"


def doc(source: str, text: str, **fields: Any) -> dict[str, Any]:
    return {"source": source, "text": text, **fields}


async def ingest(
    client: httpx.AsyncClient, collection: str, *documents: Mapping[str, Any], **fields: Any
) -> httpx.Response:
    """JSON ingestion of ``documents`` (and other top-level ``fields``, such as ``volatile``)."""
    return await client.post(
        documents_path(collection), json={"documents": list(documents), **fields}, headers=AUTH
    )


async def ingested(
    client: httpx.AsyncClient, collection: str, *documents: Mapping[str, Any], **fields: Any
) -> dict[str, Any]:
    """As :func:`ingest`, which must succeed; its ``ingestion`` object."""
    response = await ingest(client, collection, *documents, **fields)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def listed(client: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """``GET /admin/collections``, checked for its shape, by collection name."""
    response = await client.get(COLLECTIONS, headers=AUTH)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"object", "data"}
    assert body["object"] == "list"
    for entry in body["data"]:
        assert set(entry) == {"object", "name", "chunks", "documents", "volatile"}, entry
        assert entry["object"] == "collection"
    return {entry["name"]: entry for entry in body["data"]}


async def rag_sources(client: httpx.AsyncClient, engine: FakeEngine, question: str) -> list[dict[str, Any]]:
    """The sources a ``rag=on`` chat about ``question`` is given (the route's list)."""
    engine.enqueue_completion()
    response = await client.post(
        CHAT, json=chat_body(messages=[{"role": "user", "content": question}], rag="on")
    )
    assert response.status_code == 200, response.text
    sources: list[dict[str, Any]] = response.json()["route"]["rag"]["sources"]
    return sources


def texts(sources: list[dict[str, Any]]) -> str:
    return "\n".join(source["text"] for source in sources)


@pytest.fixture
def settings() -> Settings:
    return make_settings(admin_token=TOKEN)


# ---------------------------------------------------------------------------- JSON ingestion


async def test_json_documents_are_ingested_and_listed(client: httpx.AsyncClient) -> None:
    assert await listed(client) == {}
    body = await ingested(
        client,
        "handbook",
        doc("refunds.md", REFUNDS, title="Refunds", metadata={"team": "billing", "version": 2}),
        doc("shipping.md", SHIPPING, expires_at="2999-12-31T00:00:00Z"),
    )
    assert body == {
        "object": "ingestion",
        "collection": "handbook",
        "documents": 2,
        "chunks": 2,
        "unchanged": 0,
    }
    assert await listed(client) == {
        "handbook": {
            "object": "collection",
            "name": "handbook",
            "chunks": 2,
            "documents": 2,
            "volatile": False,
        }
    }


async def test_the_documents_can_be_retrieved_with_their_titles(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    await ingested(
        client, "handbook", doc("refunds.md", REFUNDS, title="Refund policy"), doc("ship.md", SHIPPING)
    )
    sources = await rag_sources(client, engine, "How long does a refund take?")
    assert sources[0]["source"] == "refunds.md"
    assert sources[0]["title"] == "Refund policy"
    assert sources[0]["text"] == REFUNDS
    assert sources[0]["collection"] == "handbook"
    assert {source["source"] for source in sources} == {"refunds.md", "ship.md"}


async def test_collections_are_listed_separately(client: httpx.AsyncClient) -> None:
    await ingested(client, "alpha", doc("a.md", REFUNDS))
    await ingested(client, "beta", doc("b.md", SHIPPING), doc("c.md", PASSWORDS))
    collections = await listed(client)
    assert sorted(collections) == ["alpha", "beta"]
    assert (collections["alpha"]["documents"], collections["beta"]["documents"]) == (1, 2)


# ---------------------------------------------------------------------------- multipart uploads

MARKDOWN = b"""# Travel policy

## Flights

Economy class is booked for every flight shorter than six hours.

## Hotels

Hotel rooms are reimbursed up to one hundred and fifty euros a night.
"""
HTML = b"""<!doctype html><html><head><title>Office hours</title><style>p {color: red}</style></head>
<body><h1>Opening times</h1><p>The office opens at eight in the morning on weekdays.</p>
<script>alert('not text')</script></body></html>"""
TEXT = b"The cafeteria serves vegetarian lunch every Wednesday.\n\nCoffee is free all day.\n"
JSONL = (
    json.dumps({"source": "faq/parking", "text": "Parking permits are renewed each January.", "floor": 2})
    + "\n\n"
    + json.dumps({"text": "Bicycles are stored in the basement.", "title": "Bicycles"})
    + "\n"
).encode()
PDF_PAGES = ("Fire drills happen on the first Monday of each quarter.", "Assembly point: the north car park.")


def upload_files() -> list[tuple[str, tuple[str, bytes, str]]]:
    """One file of every supported format, under several field names."""
    return [
        ("files", ("travel.md", MARKDOWN, "text/markdown")),
        ("files", ("hours.html", HTML, "text/html")),
        ("other", ("cafeteria.txt", TEXT, "text/plain")),
        ("files", ("faq.jsonl", JSONL, "application/jsonl")),
        ("manual", ("safety.pdf", make_pdf(*PDF_PAGES, title="Safety manual"), "application/pdf")),
    ]


async def test_a_multipart_upload_of_every_format_is_ingested(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    response = await client.post(
        documents_path("office"), files=upload_files(), data={"volatile": "true"}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    # travel.md: two sections; hours.html, cafeteria.txt: one each; faq.jsonl: two records;
    # safety.pdf: two pages.
    assert response.json() == {
        "object": "ingestion",
        "collection": "office",
        "documents": 6,
        "chunks": 8,
        "unchanged": 0,
    }
    assert (await listed(client))["office"] == {
        "object": "collection",
        "name": "office",
        "chunks": 8,
        "documents": 6,
        "volatile": True,
    }

    pdf = await rag_sources(client, engine, "When do fire drills happen?")
    assert pdf[0]["source"] == "safety.pdf"
    assert pdf[0]["title"] == "Safety manual"
    assert pdf[0]["text"] == PDF_PAGES[0]

    html = await rag_sources(client, engine, "At what time does the office open?")
    assert html[0]["source"] == "hours.html"
    assert html[0]["title"] == "Office hours"
    assert "alert" not in texts(html)

    records = await rag_sources(client, engine, "Where are bicycles stored? And parking permits?")
    assert {"faq/parking", "faq.jsonl#3"} <= {source["source"] for source in records}

    hotels = await rag_sources(client, engine, "How much is a hotel room reimbursed per night?")
    assert hotels[0]["source"] == "travel.md"
    assert hotels[0]["text"] == "Hotel rooms are reimbursed up to one hundred and fifty euros a night."


async def test_a_multipart_upload_is_idempotent_too(client: httpx.AsyncClient) -> None:
    first = await client.post(documents_path("office"), files=upload_files(), headers=AUTH)
    assert first.status_code == 200, first.text
    again = await client.post(documents_path("office"), files=upload_files(), headers=AUTH)
    assert again.status_code == 200, again.text
    assert again.json() == {**first.json(), "unchanged": 6}
    assert (await listed(client))["office"]["chunks"] == 8


@pytest.mark.parametrize("content_type", ["application/octet-stream", ""])
async def test_an_upload_without_a_specific_content_type_is_read_by_its_extension(
    client: httpx.AsyncClient, content_type: str
) -> None:
    files = {"file": ("notes.md", b"# Notes\n\nThe printer is on the second floor.", content_type)}
    response = await client.post(documents_path("office"), files=files, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["documents"] == 1


# ---------------------------------------------------------------------------- re-ingestion


async def test_ingesting_the_same_documents_again_changes_nothing(client: httpx.AsyncClient) -> None:
    documents = [doc("refunds.md", REFUNDS), doc("shipping.md", SHIPPING, metadata={"team": "logistics"})]
    first = await ingested(client, "handbook", *documents)
    assert first["unchanged"] == 0
    before = await listed(client)
    again = await ingested(client, "handbook", *documents)
    assert again == {**first, "unchanged": 2}
    assert await listed(client) == before


async def test_a_changed_document_replaces_its_chunks(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    old = "# Refunds\n\nRefunds are paid by cheque.\n\n## Exceptions\n\nSale items are never refunded."
    await ingested(client, "handbook", doc("refunds.md", old), doc("shipping.md", SHIPPING))
    assert (await listed(client))["handbook"]["chunks"] == 3

    result = await ingested(client, "handbook", doc("refunds.md", REFUNDS))
    assert result == {
        "object": "ingestion",
        "collection": "handbook",
        "documents": 1,
        "chunks": 1,
        "unchanged": 0,
    }
    collection = (await listed(client))["handbook"]
    assert (collection["documents"], collection["chunks"]) == (2, 2)

    found = texts(await rag_sources(client, engine, "Are refunds paid by cheque? Are sale items refunded?"))
    assert REFUNDS in found
    assert "cheque" not in found
    assert "Sale items" not in found


async def test_changed_metadata_alone_is_a_change(client: httpx.AsyncClient) -> None:
    await ingested(client, "handbook", doc("refunds.md", REFUNDS, metadata={"version": 1}))
    result = await ingested(client, "handbook", doc("refunds.md", REFUNDS, metadata={"version": 2}))
    assert result["unchanged"] == 0
    assert (await listed(client))["handbook"]["chunks"] == 1


# ---------------------------------------------------------------------------- volatile


async def test_volatile_is_set_on_creation_kept_when_omitted_and_flipped_when_given(
    client: httpx.AsyncClient,
) -> None:
    await ingested(client, "news", doc("today.md", SHIPPING), volatile=True)
    assert (await listed(client))["news"]["volatile"] is True

    await ingested(client, "news", doc("tomorrow.md", REFUNDS))
    assert (await listed(client))["news"]["volatile"] is True

    await ingested(client, "news", doc("today.md", SHIPPING), volatile=False)
    assert (await listed(client))["news"]["volatile"] is False

    await ingested(client, "news", doc("today.md", SHIPPING))
    assert (await listed(client))["news"]["volatile"] is False


async def test_a_collection_is_not_volatile_by_default(client: httpx.AsyncClient) -> None:
    await ingested(client, "handbook", doc("refunds.md", REFUNDS))
    assert (await listed(client))["handbook"]["volatile"] is False


async def test_the_volatile_form_field_of_an_upload_is_honoured(client: httpx.AsyncClient) -> None:
    files = {"file": ("a.txt", TEXT, "text/plain")}
    first = await client.post(documents_path("news"), files=files, data={"volatile": "yes"}, headers=AUTH)
    assert first.status_code == 200, first.text
    assert (await listed(client))["news"]["volatile"] is True
    second = await client.post(documents_path("news"), files=files, data={"volatile": "false"}, headers=AUTH)
    assert second.status_code == 200, second.text
    assert (await listed(client))["news"]["volatile"] is False


async def test_a_volatile_form_field_that_is_not_a_flag_is_400(client: httpx.AsyncClient) -> None:
    files = {"file": ("a.txt", TEXT, "text/plain")}
    response = await client.post(
        documents_path("news"), files=files, data={"volatile": "maybe"}, headers=AUTH
    )
    assert_error(response, 400, param="volatile")
    assert await listed(client) == {}


async def test_a_volatile_json_field_that_is_not_a_boolean_is_400(client: httpx.AsyncClient) -> None:
    response = await ingest(client, "news", doc("a.md", REFUNDS), volatile="true")
    assert_error(response, 400, param="volatile")
    assert await listed(client) == {}


# ---------------------------------------------------------------------------- expiry


async def test_expired_documents_are_not_retrieved(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await ingested(
        client,
        "notices",
        doc("old-refunds.md", "Refunds are paid within ninety days (old notice).", expires_at="2001-01-01"),
        doc("refunds.md", REFUNDS, expires_at="2999-01-01T00:00:00+02:00"),
        doc("epoch.md", "Refunds are paid in cash at the counter (old notice).", expires_at=978_307_200),
        doc("shipping.md", SHIPPING),
    )
    sources = await rag_sources(client, engine, "How long do refunds take?")
    assert {source["source"] for source in sources} == {"refunds.md", "shipping.md"}
    assert "old notice" not in texts(sources)


# ---------------------------------------------------------------------------- deletion


async def test_a_document_is_deleted_by_its_source(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    source = "docs/policies/refunds.md"
    old = "# Refunds\n\nRefunds are paid by cheque.\n\n## Exceptions\n\nSale items are never refunded."
    await ingested(client, "handbook", doc(source, old), doc("shipping.md", SHIPPING))

    response = await client.delete(f"{documents_path('handbook')}/{source}", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {
        "object": "document",
        "collection": "handbook",
        "source": source,
        "deleted": True,
        "chunks": 2,
    }
    collection = (await listed(client))["handbook"]
    assert (collection["documents"], collection["chunks"]) == (1, 1)
    sources = await rag_sources(client, engine, "Are refunds paid by cheque?")
    assert [s["source"] for s in sources] == ["shipping.md"]

    again = await client.delete(f"{documents_path('handbook')}/{source}", headers=AUTH)
    assert_error(again, 404, param="source", code="document_not_found")


async def test_sources_that_need_escaping_in_the_url_are_deleted(client: httpx.AsyncClient) -> None:
    sources = ["faq.jsonl#3", "my doc.md", "what?.md", "ünïcode.md", "100%.md", "a/b/c d.md"]
    await ingested(client, "handbook", *(doc(source, REFUNDS) for source in sources))
    for source in sources:
        response = await client.delete(f"{documents_path('handbook')}/{quote(source)}", headers=AUTH)
        assert response.status_code == 200, response.text
        assert response.json()["source"] == source
    assert (await listed(client))["handbook"]["chunks"] == 0


async def test_deleting_an_unknown_source_is_404(client: httpx.AsyncClient) -> None:
    await ingested(client, "handbook", doc("refunds.md", REFUNDS))
    response = await client.delete(f"{documents_path('handbook')}/nope.md", headers=AUTH)
    assert_error(response, 404, param="source", code="document_not_found")
    assert (await listed(client))["handbook"]["chunks"] == 1


async def test_deleting_from_an_unknown_collection_is_404(client: httpx.AsyncClient) -> None:
    response = await client.delete(f"{documents_path('missing')}/refunds.md", headers=AUTH)
    assert_error(response, 404, param="name", code="collection_not_found")


async def test_a_collection_is_deleted(client: httpx.AsyncClient, engine: FakeEngine) -> None:
    await ingested(client, "handbook", doc("refunds.md", REFUNDS))
    await ingested(client, "keep", doc("shipping.md", SHIPPING))

    response = await client.delete(f"{COLLECTIONS}/handbook", headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json() == {"object": "collection", "name": "handbook", "deleted": True}
    assert sorted(await listed(client)) == ["keep"]
    sources = await rag_sources(client, engine, "How long does a refund take?")
    assert [s["collection"] for s in sources] == ["keep"]

    again = await client.delete(f"{COLLECTIONS}/handbook", headers=AUTH)
    assert_error(again, 404, param="name", code="collection_not_found")


async def test_a_deleted_collection_can_be_created_again(client: httpx.AsyncClient) -> None:
    await ingested(client, "handbook", doc("refunds.md", REFUNDS), volatile=True)
    assert (await client.delete(f"{COLLECTIONS}/handbook", headers=AUTH)).status_code == 200
    result = await ingested(client, "handbook", doc("refunds.md", REFUNDS))
    assert result["unchanged"] == 0
    assert (await listed(client))["handbook"] == {
        "object": "collection",
        "name": "handbook",
        "chunks": 1,
        "documents": 1,
        "volatile": False,
    }


# ---------------------------------------------------------------------------- malformed uploads

PDF_GARBAGE = ("x.pdf", b"%PDF-1.4 garbage", "application/pdf")


@pytest.mark.parametrize(
    ("file", "status", "code"),
    [
        pytest.param(PDF_GARBAGE, 400, "invalid_document", id="corrupt-pdf"),
        pytest.param(("empty.md", b"", "text/markdown"), 400, "invalid_document", id="empty-file"),
        pytest.param(("blank.txt", b" \n\n\t ", "text/plain"), 400, "invalid_document", id="whitespace-only"),
        pytest.param(
            ("latin1.txt", "Café".encode("latin-1"), "text/plain"), 400, "invalid_document", id="not-utf8"
        ),
        pytest.param(
            ("bad.jsonl", b'{"text": "ok"}\n{oops\n', "application/jsonl"),
            400,
            "invalid_document",
            id="bad-jsonl",
        ),
        pytest.param(
            ("blank.pdf", make_pdf(""), "application/pdf"), 400, "invalid_document", id="pdf-without-text"
        ),
        pytest.param(
            ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 32, "image/png"),
            415,
            "unsupported_document",
            id="png",
        ),
        pytest.param(
            ("notes.md", b"# Notes\n\nText.", "image/png"), 415, "unsupported_document", id="type-mismatch"
        ),
    ],
)
async def test_a_bad_file_is_refused_and_nothing_is_written(
    client: httpx.AsyncClient, file: tuple[str, bytes, str], status: int, code: str
) -> None:
    response = await client.post(documents_path("uploads"), files={"file": file}, headers=AUTH)
    error = assert_error(response, status, param="file", code=code)
    assert file[0] in error["message"]
    assert await listed(client) == {}


async def test_one_bad_file_in_a_batch_refuses_the_whole_batch(client: httpx.AsyncClient) -> None:
    files = [("files", ("good.md", b"# Good\n\nThis one parses.", "text/markdown")), ("files", PDF_GARBAGE)]
    response = await client.post(documents_path("uploads"), files=files, headers=AUTH)
    assert_error(response, 400, param="file", code="invalid_document")
    assert await listed(client) == {}


async def test_a_bad_batch_leaves_an_existing_collection_as_it_was(
    client: httpx.AsyncClient, engine: FakeEngine
) -> None:
    await ingested(client, "uploads", doc("good.md", REFUNDS))
    before = await listed(client)
    files = [("files", ("good.md", b"# Good\n\nReplaced text.", "text/markdown")), ("files", PDF_GARBAGE)]
    response = await client.post(documents_path("uploads"), files=files, headers=AUTH)
    assert_error(response, 400, param="file", code="invalid_document")
    assert await listed(client) == before
    assert texts(await rag_sources(client, engine, "What was replaced?")) == REFUNDS


async def test_an_upload_without_files_is_400(client: httpx.AsyncClient) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="volatile"\r\n\r\ntrue\r\n--{boundary}--\r\n'
    )
    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
    response = await client.post(documents_path("uploads"), content=body.encode(), headers=headers)
    assert_error(response, 400, param="files")
    assert await listed(client) == {}


async def test_an_uploaded_file_without_a_name_is_400(client: httpx.AsyncClient) -> None:
    boundary = "b0undary"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename=""\r\n'
        f"Content-Type: text/plain\r\n\r\nSome text.\r\n--{boundary}--\r\n"
    )
    headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
    response = await client.post(documents_path("uploads"), content=body.encode(), headers=headers)
    assert_error(response, 400, param="files")
    assert await listed(client) == {}


async def test_the_same_source_twice_in_one_upload_is_400(client: httpx.AsyncClient) -> None:
    files = [
        ("a", ("same.txt", b"First text.", "text/plain")),
        ("b", ("same.txt", b"Second text.", "text/plain")),
    ]
    response = await client.post(documents_path("uploads"), files=files, headers=AUTH)
    error = assert_error(response, 400, param="documents", code="invalid_document")
    assert "same.txt" in error["message"]
    assert await listed(client) == {}


# ---------------------------------------------------------------------------- malformed JSON


async def test_a_body_neither_json_nor_multipart_is_415(client: httpx.AsyncClient) -> None:
    response = await client.post(
        documents_path("notes"), content=b"just some text", headers={**AUTH, "content-type": "text/plain"}
    )
    assert_error(response, 415, param=None)
    assert await listed(client) == {}


async def test_invalid_json_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        documents_path("notes"),
        content=b'{"documents": [',
        headers={**AUTH, "content-type": "application/json"},
    )
    assert_error(response, 400, param=None)
    assert await listed(client) == {}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        pytest.param({"documents": []}, "documents", id="no-documents"),
        pytest.param({}, "documents", id="documents-missing"),
        pytest.param({"documents": "refunds.md"}, "documents", id="documents-not-a-list"),
        pytest.param({"documents": [{"text": REFUNDS}]}, "documents[0].source", id="source-missing"),
        pytest.param({"documents": [{"source": "a.md"}]}, "documents[0].text", id="text-missing"),
        pytest.param(
            {"documents": [doc("a.md", REFUNDS, author="me")]}, "documents[0].author", id="unknown-field"
        ),
        pytest.param(
            {"documents": [doc("a.md", REFUNDS)], "replace": True}, "replace", id="unknown-top-field"
        ),
        pytest.param(
            {"documents": [{"source": "a.md", "text": 42}]}, "documents[0].text", id="text-not-a-string"
        ),
    ],
)
async def test_a_malformed_request_is_400(
    client: httpx.AsyncClient, body: dict[str, Any], param: str
) -> None:
    response = await client.post(documents_path("notes"), json=body, headers=AUTH)
    assert_error(response, 400, param=param)
    assert await listed(client) == {}


@pytest.mark.parametrize(
    ("document", "param"),
    [
        pytest.param(
            doc("a.md", REFUNDS, metadata={"source": "b.md"}), "documents[0].metadata", id="reserved-source"
        ),
        pytest.param(
            doc("a.md", REFUNDS, metadata={"chunks": 3}), "documents[0].metadata", id="reserved-chunks"
        ),
        pytest.param(
            doc("a.md", REFUNDS, metadata={"$where": 1}), "documents[0].metadata", id="operator-key"
        ),
        pytest.param(
            doc("a.md", REFUNDS, metadata={"tags": ["a"]}), "documents[0].metadata", id="list-value"
        ),
        pytest.param(
            doc("a.md", REFUNDS, expires_at="next tuesday"), "documents[0].expires_at", id="bad-expiry"
        ),
        pytest.param(doc("a.md", REFUNDS, expires_at=1e300), "documents[0].expires_at", id="huge-expiry"),
        pytest.param(doc("  ", REFUNDS), "documents[0].source", id="blank-source"),
        pytest.param(doc("a\nb.md", REFUNDS), "documents[0].source", id="newline-in-source"),
        pytest.param(doc("a.md", "   \n\n  "), "documents[0].text", id="blank-text"),
    ],
)
async def test_an_invalid_document_is_400_naming_its_field(
    client: httpx.AsyncClient, document: dict[str, Any], param: str
) -> None:
    response = await ingest(client, "notes", doc("good.md", SHIPPING), document)
    assert_error(response, 400, param=param.replace("[0]", "[1]"), code="invalid_document")
    assert await listed(client) == {}


async def test_an_invalid_document_leaves_an_existing_collection_as_it_was(client: httpx.AsyncClient) -> None:
    await ingested(client, "notes", doc("a.md", REFUNDS))
    before = await listed(client)
    response = await ingest(
        client, "notes", doc("b.md", SHIPPING), doc("c.md", PASSWORDS, metadata={"source": "x"})
    )
    assert_error(response, 400, param="documents[1].metadata", code="invalid_document")
    assert await listed(client) == before


async def test_the_same_source_twice_in_one_request_is_400(client: httpx.AsyncClient) -> None:
    response = await ingest(
        client, "notes", doc("a.md", REFUNDS), doc("b.md", SHIPPING), doc("a.md", PASSWORDS)
    )
    error = assert_error(response, 400, param="documents", code="invalid_document")
    assert "a.md" in error["message"]
    assert await listed(client) == {}


@pytest.mark.parametrize(
    "name",
    [
        "a",
        "ab",
        "bad name!",
        "-leading",
        "trailing-",
        "x" * 64,
        "dots..",
        "ünïcode",
        # These match the gateway's own pattern, but chromadb refuses them: still the client's
        # mistake (a 400 naming "name"), never a 503 that SDKs would retry.
        "a..b",
        "docs..v2",
        "10.0.0.1",
    ],
)
async def test_an_invalid_collection_name_is_400(client: httpx.AsyncClient, name: str) -> None:
    response = await ingest(client, name, doc("a.md", REFUNDS))
    assert_error(response, 400, param="name", code="invalid_document")
    files = {"file": ("a.txt", TEXT, "text/plain")}
    response = await client.post(documents_path(name), files=files, headers=AUTH)
    assert_error(response, 400, param="name", code="invalid_document")
    assert await listed(client) == {}


async def test_names_of_three_and_sixty_three_characters_are_valid(client: httpx.AsyncClient) -> None:
    for name in ["abc", "a" * 63, "Team_1.docs-v2"]:
        await ingested(client, name, doc("a.md", REFUNDS))
    assert sorted(await listed(client)) == sorted(["abc", "a" * 63, "Team_1.docs-v2"])


# ---------------------------------------------------------------------------- body size


class TestSmallUploadLimit:
    LIMIT = 1024

    @pytest.fixture
    def settings(self) -> Settings:
        return make_settings(admin_token=TOKEN, max_document_upload_bytes=self.LIMIT)

    async def test_a_declared_body_over_the_limit_is_413(self, client: httpx.AsyncClient) -> None:
        files = {"file": ("big.txt", b"word " * 400, "text/plain")}
        response = await client.post(documents_path("notes"), files=files, headers=AUTH)
        assert_error(response, 413, param=None)
        assert str(self.LIMIT) in response.json()["error"]["message"]
        assert await listed(client) == {}

    async def test_a_json_body_over_the_limit_is_413(self, client: httpx.AsyncClient) -> None:
        response = await ingest(client, "notes", doc("big.md", "word " * 400))
        assert_error(response, 413, param=None)
        assert await listed(client) == {}

    async def test_a_chunked_body_over_the_limit_is_413(self, client: httpx.AsyncClient) -> None:
        boundary = "b0undary"
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.txt"\r\n'
            "Content-Type: text/plain\r\n\r\n"
        ).encode()

        async def body() -> AsyncIterator[bytes]:
            yield head
            for _ in range(8):
                yield b"word " * 100
            yield f"\r\n--{boundary}--\r\n".encode()

        headers = {**AUTH, "content-type": f"multipart/form-data; boundary={boundary}"}
        response = await client.post(documents_path("notes"), content=body(), headers=headers)
        assert "content-length" not in response.request.headers
        assert_error(response, 413, param=None)
        assert await listed(client) == {}

    async def test_a_body_under_the_limit_is_accepted(self, client: httpx.AsyncClient) -> None:
        await ingested(client, "notes", doc("small.md", REFUNDS))


async def test_a_50_mb_upload_is_refused_from_its_content_length(client: httpx.AsyncClient) -> None:
    size = 50 * 1024 * 1024
    response = await client.post(
        documents_path("notes"),
        content=bytes(size),
        headers={**AUTH, "content-type": "multipart/form-data; boundary=b0undary"},
    )
    assert response.request.headers["content-length"] == str(size)
    assert_error(response, 413, param=None)
    assert await listed(client) == {}


async def test_an_oversized_upload_is_refused_without_reading_its_body(client: httpx.AsyncClient) -> None:
    sent = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal sent
        for _ in range(50):
            sent += 1
            yield bytes(1024 * 1024)

    headers = {
        **AUTH,
        "content-type": "multipart/form-data; boundary=b0undary",
        "content-length": str(50 * 1024 * 1024),
    }
    response = await client.post(documents_path("notes"), content=body(), headers=headers)
    assert_error(response, 413, param=None)
    assert sent == 0
    assert await listed(client) == {}


# ---------------------------------------------------------------------------- the admin token

ROUTES = [
    ("GET", COLLECTIONS),
    ("POST", documents_path("notes")),
    ("DELETE", f"{documents_path('notes')}/docs/a.md"),
    ("DELETE", f"{COLLECTIONS}/notes"),
]


async def call(
    client: httpx.AsyncClient, method: str, path: str, headers: Mapping[str, str]
) -> httpx.Response:
    body = {"documents": [doc("a.md", REFUNDS)]} if method == "POST" else None
    return await client.request(method, path, json=body, headers=headers)


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_without_a_token_is_401(client: httpx.AsyncClient, method: str, path: str) -> None:
    response = await call(client, method, path, {})
    assert_admin_error(response, 401, param=None, code="missing_admin_token")
    assert response.headers["www-authenticate"] == "Bearer"
    assert await listed(client) == {}


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_a_wrong_token_is_401(client: httpx.AsyncClient, method: str, path: str) -> None:
    await ingested(client, "notes", doc("docs/a.md", REFUNDS))
    before = await listed(client)
    response = await call(client, method, path, {"Authorization": "Bearer not-the-token"})
    assert_admin_error(response, 401, param=None, code="invalid_admin_token")
    assert response.headers["www-authenticate"] == "Bearer"
    assert await listed(client) == before


async def test_an_unauthenticated_upload_is_refused_before_it_is_read(client: httpx.AsyncClient) -> None:
    read = 0

    async def body() -> AsyncIterator[bytes]:
        nonlocal read
        read += 1
        yield b'{"documents": [{"source": "a.md", "text": "Some text."}]}'

    response = await client.post(
        documents_path("notes"), content=body(), headers={"content-type": "application/json"}
    )
    assert_admin_error(response, 401, param=None, code="missing_admin_token")
    assert read == 0
    assert await listed(client) == {}


async def test_collections_routes_are_not_mounted_without_a_token(engine: FakeEngine, tmp_path: Path) -> None:
    async with running_gateway(make_settings(admin_token=None), engine, tmp_path) as (_, client):
        for method, path in ROUTES:
            response = await call(client, method, path, AUTH)
            error = assert_admin_error(response, 404, param=None, code=None)
            assert path in error["message"]
        # rag=on still works, with nothing to retrieve
        engine.enqueue_completion()
        response = await client.post(CHAT, json=chat_body(rag="on"))
        assert response.status_code == 200, response.text
        assert response.json()["route"]["rag"] == {"used": False, "sources": []}
