"""What the index package raises. Nothing here knows about HTTP: the gateway maps these onto
its own error envelope.

The tree:

    IndexFailure                 any failure of this package
    ├── DocumentError            a document or request is wrong (gateway: 400, names ``param``)
    │   └── UnsupportedFormat    a file whose type we do not read (gateway: 415)
    ├── CollectionNotFound       no collection of that name (gateway: 404)
    ├── DocumentNotFound         no document with that source in the collection (gateway: 404)
    └── IndexUnavailable         the vector store cannot be reached or failed (gateway: 503)

Each message says what to fix, because it goes back to the operator verbatim.
"""

from __future__ import annotations


class IndexFailure(Exception):  # noqa: N818 - names the condition, like its subclasses
    """Base of every error this package raises."""


class DocumentError(IndexFailure):
    """A document, a file or a collection name that must not reach the index."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class UnsupportedFormat(DocumentError):  # noqa: N818 - reads as the condition it reports
    """The file's type (by name or content type) is not one the index reads."""


class CollectionNotFound(IndexFailure):
    def __init__(self, name: str) -> None:
        super().__init__(f"collection {name!r} does not exist")
        self.name = name


class DocumentNotFound(IndexFailure):
    def __init__(self, collection: str, source: str) -> None:
        super().__init__(f"collection {collection!r} has no document with source {source!r}")
        self.collection = collection
        self.source = source


class IndexUnavailable(IndexFailure):
    """The vector store failed for a reason that is not the caller's."""
