"""OpenAPI fragments for the routes that parse their bodies by hand (``parse_json_body``), so
that ``/openapi.json`` still describes what they take and return."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode

_DEFS = "#/$defs/"


def inline_schema(model: type[BaseModel], mode: JsonSchemaMode = "validation") -> dict[str, Any]:
    """``model``'s JSON schema with every ``$defs`` reference replaced by its definition: a schema
    nested in an OpenAPI operation cannot reach its own ``$defs``, only the document's."""
    schema = model.model_json_schema(mode=mode)
    defs: dict[str, Any] = schema.pop("$defs", {})

    def resolve(node: Any, seen: frozenset[str]) -> Any:
        if isinstance(node, list):
            return [resolve(item, seen) for item in node]
        if not isinstance(node, dict):
            return node
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(_DEFS):
            name = ref.removeprefix(_DEFS)
            if name in seen:
                raise ValueError(f"{model.__name__}: {name} is recursive and cannot be inlined")
            siblings = {key: value for key, value in node.items() if key != "$ref"}
            return resolve({**defs[name], **siblings}, seen | {name})
        return {
            key: resolve(value, seen)
            for key, value in node.items()
            # A discriminator's mapping points into $defs; the members' constant tags say the same.
            if not (key == "discriminator" and isinstance(value, dict) and "propertyName" in value)
        }

    resolved: dict[str, Any] = resolve(schema, frozenset())
    return resolved


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """``openapi_extra`` for a route whose JSON body is ``model``."""
    return {
        "requestBody": {"required": True, "content": {"application/json": {"schema": inline_schema(model)}}}
    }
