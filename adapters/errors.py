"""What the adapter store and its validation raise. Nothing here knows about HTTP: the gateway
maps these onto its own error envelope.

The tree:

    AdapterError                 any failure of this package
    ├── AdapterValidationError   the operator's adapter or request is wrong (gateway: 400, names ``param``)
    └── AdapterStoreError        the store cannot do what was asked
        └── AdapterExistsError   the name is taken and ``replace`` was not given (gateway: 409)

Each validation message says what to fix, because it goes back to the operator verbatim.
"""

from __future__ import annotations


class AdapterError(Exception):
    """Base of every error this package raises."""


class AdapterValidationError(AdapterError):
    """An adapter, a name or a source path that must not reach the engine."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class AdapterStoreError(AdapterError):
    """The store refused or failed an operation for a reason other than the adapter itself."""


class AdapterExistsError(AdapterStoreError):
    """An adapter of that name is registered and the caller did not ask to replace it."""

    def __init__(self, name: str) -> None:
        super().__init__(f"adapter {name!r} already exists; pass replace=true to swap it")
        self.name = name
