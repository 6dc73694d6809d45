"""Validates bodies and stream chunks against OpenAI's published OpenAPI description
(``../shared/data/openai/openapi.yaml``).

The file declares OpenAPI 3.1 but marks nullable fields the 3.0 way (``nullable: true``);
they are translated to JSON Schema's ``null`` type before validating, or valid nulls would be
rejected.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator

SPEC = Path(__file__).resolve().parents[2] / "shared" / "data" / "openai" / "openapi.yaml"


def _nullable_to_null(node: Any) -> Any:
    if isinstance(node, list):
        return [_nullable_to_null(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _nullable_to_null(value) for key, value in node.items()}
    if node.pop("nullable", False):
        if "$ref" in node or "allOf" in node or "anyOf" in node or "oneOf" in node:
            return {"anyOf": [node, {"type": "null"}]}
        kind = node.get("type")
        if isinstance(kind, str):
            node["type"] = [kind, "null"]
        elif isinstance(kind, list) and "null" not in kind:
            node["type"] = [*kind, "null"]
        if "enum" in node and None not in node["enum"]:
            node["enum"] = [*node["enum"], None]
    return node


@cache
def _components() -> dict[str, Any]:
    with SPEC.open() as handle:
        document = yaml.load(handle, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    components: dict[str, Any] = _nullable_to_null(document["components"])
    return components


@cache
def validator(schema_name: str) -> Draft202012Validator:
    root = {"$ref": f"#/components/schemas/{schema_name}", "components": _components()}
    return Draft202012Validator(root)


def schema_errors(schema_name: str, instance: object) -> list[str]:
    """Every way ``instance`` breaks the schema, as readable lines (empty when it conforms)."""
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator(schema_name).iter_errors(instance)
    ]


def assert_conforms(schema_name: str, instance: object) -> None:
    errors = schema_errors(schema_name, instance)
    assert not errors, f"{schema_name} violations:\n" + "\n".join(errors)
