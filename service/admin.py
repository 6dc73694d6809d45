"""The admin API: adapters. Mounted only when ``HYBRID_ADMIN_TOKEN`` is set; every route needs
that bearer token (401 without it or with a wrong one, compared in constant time)."""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError
from pydantic_core import PydanticCustomError
from starlette.datastructures import FormData, UploadFile

from adapters.errors import AdapterValidationError
from adapters.manifest import CONFIG_FILE, WEIGHTS_FILE
from adapters.store import AdapterRecord
from adapters.validation import resolve_import_path
from service.adapter_registry import AdapterRegistry, AdapterSource, Registration, RoutingUpdate
from service.auth import require_admin
from service.errors import InvalidRequestError
from service.openapi import json_body
from service.parsing import invalid_request, parse_json_body
from service.settings import Settings

MAX_CONFIG_BYTES = 1024 * 1024
MAX_FORM_FIELD_BYTES = 64 * 1024 * 1024
"""The largest form field of an upload: ``training_prompts``, up to 5,000 prompts of 2,000
characters, JSON-escaped (``\\uXXXX`` is six bytes a character)."""


async def _registry(request: Request) -> AdapterRegistry:
    registry: AdapterRegistry = request.app.state.adapters
    return registry


RegistryDep = Annotated[AdapterRegistry, Depends(_registry)]
router = APIRouter(prefix="/admin", dependencies=[Depends(require_admin)], tags=["admin"])


Description = Annotated[str, Field(max_length=2000)]
Examples = Annotated[list[Annotated[str, Field(max_length=2000)]], Field(max_length=200)]
Threshold = Annotated[float, Field(ge=-1.0, le=1.0)]


def _not_blank(text: str) -> str:
    if not text.strip():
        raise PydanticCustomError("blank_string", "a training prompt must not be blank")
    return text


TrainingPrompts = Annotated[
    list[Annotated[str, Field(max_length=2000), AfterValidator(_not_blank)]], Field(max_length=5000)
]
"""Prompts of the adapter's training data: the router learns the adapter's class from them."""


class RegisterAdapter(BaseModel):
    """A registration naming a server-side directory under ``HYBRID_ADAPTER_IMPORT_DIR``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    name: str
    path: str
    description: Description = ""
    examples: Examples = []
    threshold: Threshold | None = None
    allow_retrieval: bool = True
    replace: bool = False
    training_prompts: TrainingPrompts = []

    def registration(self) -> Registration:
        return Registration(
            self.name,
            self.description,
            tuple(self.examples),
            self.threshold,
            self.allow_retrieval,
            self.replace,
            training_prompts=tuple(self.training_prompts),
        )


class UpdateAdapter(BaseModel):
    """New routing fields for a registered adapter; a field left out is left as it is, and
    ``"threshold": null`` goes back to the default threshold."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    description: Description | None = None
    examples: Examples | None = None
    threshold: Threshold | None = None
    allow_retrieval: bool | None = None
    training_prompts: TrainingPrompts | None = None

    def update(self) -> RoutingUpdate:
        return RoutingUpdate(
            description=self.description,
            examples=None if self.examples is None else tuple(self.examples),
            threshold=self.threshold,
            clear_threshold="threshold" in self.model_fields_set and self.threshold is None,
            allow_retrieval=self.allow_retrieval,
            training_prompts=None if self.training_prompts is None else tuple(self.training_prompts),
        )


# The JSON form is described; the multipart upload (see the README) is accepted too.
@router.post("/adapters", status_code=201, openapi_extra=json_body(RegisterAdapter))
async def register_adapter(request: Request, registry: RegistryDep) -> JSONResponse:
    settings: Settings = request.app.state.settings
    content_type = request.headers.get("content-type", "")
    with _scratch(settings.adapter_store_dir) as scratch:
        if content_type.startswith("multipart/form-data"):
            async with request.form(max_files=2, max_fields=20, max_part_size=MAX_FORM_FIELD_BYTES) as form:
                registration, source = await _from_upload(form, scratch)
        else:
            body = await parse_json_body(request, RegisterAdapter)
            source = await asyncio.to_thread(
                _from_import_dir, body.path, settings.adapter_import_dir, scratch
            )
            registration = body.registration()
        record = await registry.register(registration, source)
    return JSONResponse(adapter_json(record), status_code=201)


@router.get("/adapters")
async def list_adapters(registry: RegistryDep) -> dict[str, Any]:
    return {"object": "list", "data": [adapter_json(r) for r in registry.list()]}


@router.get("/adapters/{name}")
async def get_adapter(name: str, registry: RegistryDep) -> dict[str, Any]:
    return adapter_json(registry.get(name))


@router.patch("/adapters/{name}", openapi_extra=json_body(UpdateAdapter))
async def update_adapter(name: str, request: Request, registry: RegistryDep) -> dict[str, Any]:
    body = await parse_json_body(request, UpdateAdapter)
    return adapter_json(await registry.update(name, body.update()))


@router.delete("/adapters/{name}", status_code=204)
async def delete_adapter(name: str, registry: RegistryDep) -> Response:
    await registry.delete(name)
    return Response(status_code=204)


def adapter_json(record: AdapterRecord) -> dict[str, Any]:
    manifest = record.manifest
    return {
        "object": "adapter",
        "name": manifest.name,
        "description": manifest.description,
        "examples": list(manifest.examples),
        "threshold": manifest.threshold,
        "allow_retrieval": manifest.allow_retrieval,
        "sha256": manifest.sha256,
        "rank": manifest.rank,
        "alpha": manifest.alpha,
        "target_modules": list(manifest.target_modules),
        "base_model": manifest.base_model,
        "created_at": manifest.created_at.isoformat(),
        # A count: an adapter trained on thousands of rows carries thousands of prompts.
        "training_prompts": len(manifest.training_prompts),
    }


@contextmanager
def _scratch(store_dir: Path) -> Iterator[Path]:
    """A private directory on the store's filesystem (the final copy is then cheap); the
    store's own start-up sweep removes it if the gateway dies meanwhile."""
    store_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=store_dir, prefix=".tmp-upload-") as scratch:
        yield Path(scratch)


def _from_import_dir(raw: str, import_root: Path | None, scratch: Path) -> AdapterSource:
    """Copy the two files out of the import directory first, so that what is validated is what
    is stored even if someone edits the source meanwhile."""
    try:
        directory = resolve_import_path(raw, import_root)
    except AdapterValidationError as exc:
        raise InvalidRequestError(exc.message, param=exc.param, code="invalid_adapter") from exc
    if not directory.is_dir():
        raise InvalidRequestError(f"'{raw}' is not a directory holding a PEFT adapter.", param="path")
    # resolve_import_path has refused a directory holding pickles (or code) already.
    config, weights = directory / CONFIG_FILE, directory / WEIGHTS_FILE
    for needed in (config, weights):
        if not needed.is_file():
            raise InvalidRequestError(f"'{raw}' has no {needed.name}.", param="path", code="invalid_adapter")
    if config.stat().st_size > MAX_CONFIG_BYTES:
        raise InvalidRequestError(f"{CONFIG_FILE} is too large.", param="path", code="invalid_adapter")
    shutil.copyfile(weights, scratch / WEIGHTS_FILE)
    return AdapterSource(config.read_bytes(), scratch / WEIGHTS_FILE)


async def _from_upload(form: FormData, scratch: Path) -> tuple[Registration, AdapterSource]:
    """Multipart: files ``adapter_config`` and ``adapter_model``, and the JSON fields as form
    fields (``examples`` and ``training_prompts`` JSON lists)."""
    config_file, weights_file = form.get("adapter_config"), form.get("adapter_model")
    if not isinstance(config_file, UploadFile) or not isinstance(weights_file, UploadFile):
        raise InvalidRequestError(
            "Upload two files: 'adapter_config' (adapter_config.json) and 'adapter_model' "
            "(adapter_model.safetensors).",
            param="adapter_model",
        )
    fields: dict[str, Any] = {k: v for k, v in form.items() if isinstance(v, str)}
    try:
        for listed in ("examples", "training_prompts"):
            if listed in fields:
                fields[listed] = json.loads(fields[listed])
        if "threshold" in fields:
            fields["threshold"] = float(fields["threshold"])
        for flag in ("replace", "allow_retrieval"):
            if flag in fields:
                fields[flag] = fields[flag].lower() in {"1", "true", "yes"}
    except (ValueError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"A form field is malformed: {exc}.", param=None) from None
    try:
        body = RegisterAdapter.model_validate({**fields, "path": ""})
    except ValidationError as exc:
        raise invalid_request(exc) from None
    weights = scratch / WEIGHTS_FILE
    filename = weights_file.filename or ""
    if filename.endswith((".bin", ".pt", ".pth", ".pkl")):
        raise InvalidRequestError(
            f"'{filename}' is a pickle, which is never loaded: upload adapter_model.safetensors "
            "(save with safe_serialization=True).",
            param="adapter_model",
            code="invalid_adapter",
        )
    await asyncio.to_thread(_save_upload, weights_file, weights)
    config_bytes = await config_file.read()
    return body.registration(), AdapterSource(config_bytes, weights)


def _save_upload(upload: UploadFile, target: Path) -> None:
    upload.file.seek(0)
    with target.open("wb") as out:
        shutil.copyfileobj(upload.file, out, 1 << 20)
