"""The manifest stored beside each adapter's PEFT files: what the router and the admin API need
to know about it without opening the weights.

It is parsed strictly: a manifest that does not parse means the directory is not a complete
adapter, and the store then ignores the directory instead of serving something half known.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeGuard, TypeVar

from adapters.validation import AdapterSpec

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
MANIFEST_FILE = "manifest.json"
FORMAT = 1

_T = TypeVar("_T")


class ManifestError(ValueError):
    """A manifest file that is not one this code wrote."""


@dataclass(frozen=True)
class AdapterManifest:
    name: str
    description: str
    examples: tuple[str, ...]
    """Example prompts: the router's domain signal for this adapter."""
    threshold: float | None
    """Routing threshold; None until one is given or fitted."""
    allow_retrieval: bool
    """False: requests served by this adapter never get retrieved context (an operator's call,
    e.g. an adapter whose answers must come from its training alone)."""
    sha256: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str
    created_at: datetime
    """Timezone-aware, UTC."""
    training_prompts: tuple[str, ...] = ()
    """Prompts of the adapter's training data: the router learns the adapter's class from them,
    with the examples."""

    @classmethod
    def from_spec(
        cls,
        name: str,
        spec: AdapterSpec,
        *,
        description: str = "",
        examples: tuple[str, ...] = (),
        threshold: float | None = None,
        allow_retrieval: bool = True,
        created_at: datetime | None = None,
        training_prompts: tuple[str, ...] = (),
    ) -> AdapterManifest:
        """The manifest of a freshly validated adapter."""
        return cls(
            name=name,
            description=description,
            examples=tuple(examples),
            threshold=threshold,
            allow_retrieval=allow_retrieval,
            sha256=spec.sha256,
            rank=spec.rank,
            alpha=spec.alpha,
            target_modules=spec.target_modules,
            base_model=spec.base_model_name_or_path,
            created_at=created_at or datetime.now(UTC),
            training_prompts=tuple(training_prompts),
        )

    def to_json(self) -> bytes:
        payload = {
            "format": FORMAT,
            "name": self.name,
            "description": self.description,
            "examples": list(self.examples),
            "threshold": self.threshold,
            "allow_retrieval": self.allow_retrieval,
            "sha256": self.sha256,
            "rank": self.rank,
            "alpha": self.alpha,
            "target_modules": list(self.target_modules),
            "base_model": self.base_model,
            "created_at": self.created_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
            "training_prompts": list(self.training_prompts),
        }
        return json.dumps(payload, indent=2).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> AdapterManifest:
        """Parse a manifest, raising :class:`ManifestError` for anything this code did not write."""
        try:
            data = json.loads(raw.decode("utf-8"))
        except ValueError as exc:
            raise ManifestError(f"not JSON: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ManifestError("not a manifest of a format this code reads")
        try:
            created_at = datetime.fromisoformat(_typed(data, "created_at", str))
        except ValueError:
            raise ManifestError("created_at is not an ISO-8601 time") from None
        if created_at.tzinfo is None:
            raise ManifestError("created_at has no time zone")
        threshold = data.get("threshold")
        if threshold is not None and not (_is_number(threshold) and math.isfinite(threshold)):
            raise ManifestError("threshold is not a number")
        # Absent from manifests written before routing could forbid retrieval: allowed.
        allow_retrieval = data.get("allow_retrieval", True)
        if not isinstance(allow_retrieval, bool):
            raise ManifestError("allow_retrieval is not a boolean")
        # Absent from manifests written before adapters carried their training prompts: none.
        training_prompts = _strings(data, "training_prompts") if "training_prompts" in data else ()
        alpha = data.get("alpha")
        if not _is_number(alpha):
            raise ManifestError("alpha is not a number")
        return cls(
            name=_typed(data, "name", str),
            description=_typed(data, "description", str),
            examples=_strings(data, "examples"),
            threshold=None if threshold is None else float(threshold),
            allow_retrieval=allow_retrieval,
            sha256=_typed(data, "sha256", str),
            rank=_typed(data, "rank", int),
            alpha=float(alpha),
            target_modules=_strings(data, "target_modules"),
            base_model=_typed(data, "base_model", str),
            created_at=created_at.astimezone(UTC),
            training_prompts=training_prompts,
        )


def _typed(data: dict[str, Any], key: str, kind: type[_T]) -> _T:
    value = data.get(key)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ManifestError(f"{key} is missing or not a {kind.__name__}")
    return value


def _strings(data: dict[str, Any], key: str) -> tuple[str, ...]:
    value = data.get(key)
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ManifestError(f"{key} is not a list of strings")
    return tuple(value)


def _is_number(value: object) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
