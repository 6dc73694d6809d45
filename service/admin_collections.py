"""The admin API: collections of documents. Same token as the adapters (``require_admin``).

``POST /admin/collections/{name}/documents`` takes JSON documents or multipart files (each
file's name is its source); nothing is written unless every document of the request parses.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from index.documents import SourceDocument
from index.errors import DocumentError
from index.ingest import IngestResult
from index.loaders import text_document
from index.store import CollectionInfo
from service.auth import require_admin
from service.errors import InvalidRequestError
from service.knowledge import Knowledge, UploadedFile
from service.openapi import json_body
from service.parsing import parse_json_body

MAX_FILES = 1000


async def _knowledge(request: Request) -> Knowledge:
    knowledge: Knowledge = request.app.state.knowledge
    return knowledge


KnowledgeDep = Annotated[Knowledge, Depends(_knowledge)]
router = APIRouter(prefix="/admin/collections", dependencies=[Depends(require_admin)], tags=["admin"])


class DocumentIn(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    source: str
    text: str
    title: str | None = None
    metadata: dict[str, Any] | None = None
    expires_at: str | int | float | None = None


class IngestRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    documents: Annotated[list[DocumentIn], Field(min_length=1, max_length=10_000)]
    volatile: bool | None = None

    def source_documents(self) -> list[SourceDocument]:
        return [
            text_document(
                doc.source,
                doc.text,
                title=doc.title,
                metadata=doc.metadata,
                expires_at=doc.expires_at,
                param=f"documents[{index}]",
            )
            for index, doc in enumerate(self.documents)
        ]


# The JSON form is described; multipart files (see the README) are accepted too.
@router.post("/{name}/documents", openapi_extra=json_body(IngestRequest))
async def ingest(name: str, request: Request, knowledge: KnowledgeDep) -> dict[str, Any]:
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("multipart/form-data"):
        async with request.form(max_files=MAX_FILES, max_fields=10) as form:
            files = [
                UploadedFile(item.filename or "", item.content_type, await item.read())
                for _, item in form.multi_items()
                if isinstance(item, UploadFile)
            ]
            volatile = _flag(form.get("volatile"))
        if not files:
            raise InvalidRequestError("Upload at least one file (any field name).", param="files")
        if any(not file.filename for file in files):
            raise InvalidRequestError(
                "Every uploaded file needs a file name: it is the source.", param="files"
            )
        result = await knowledge.ingest_files(name, files, volatile=volatile)
    else:
        body = await parse_json_body(request, IngestRequest)
        try:
            documents = body.source_documents()
        except DocumentError as exc:
            raise InvalidRequestError(exc.message, param=exc.param, code="invalid_document") from None
        result = await knowledge.ingest_documents(name, documents, volatile=body.volatile)
    return _ingestion_json(name, result)


@router.get("")
async def list_collections(knowledge: KnowledgeDep) -> dict[str, Any]:
    return {"object": "list", "data": [_collection_json(info) for info in await knowledge.collections()]}


@router.delete("/{name}/documents/{source:path}")
async def delete_document(name: str, source: str, knowledge: KnowledgeDep) -> dict[str, Any]:
    chunks = await knowledge.delete_document(name, source)
    return {"object": "document", "collection": name, "source": source, "deleted": True, "chunks": chunks}


@router.delete("/{name}")
async def delete_collection(name: str, knowledge: KnowledgeDep) -> dict[str, Any]:
    await knowledge.delete_collection(name)
    return {"object": "collection", "name": name, "deleted": True}


def _flag(value: object) -> bool | None:
    if value is None:
        return None
    if isinstance(value, str) and value.lower() in {"1", "true", "yes", "on"}:
        return True
    if isinstance(value, str) and value.lower() in {"0", "false", "no", "off"}:
        return False
    raise InvalidRequestError("'volatile' must be true or false.", param="volatile")


def _ingestion_json(name: str, result: IngestResult) -> dict[str, Any]:
    return {
        "object": "ingestion",
        "collection": name,
        "documents": result.documents,
        "chunks": result.chunks,
        "unchanged": result.unchanged,
    }


def _collection_json(info: CollectionInfo) -> dict[str, Any]:
    return {
        "object": "collection",
        "name": info.name,
        "chunks": info.chunks,
        "documents": info.documents,
        "volatile": info.volatile,
    }
