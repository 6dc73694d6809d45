"""Real PEFT LoRA adapters on the bundled model, made during the test run (nothing downloaded).

PEFT initialises ``lora_B`` to zero, so a fresh adapter changes nothing; :func:`make_lora_adapter`
fills it with seeded noise so that the adapter's output visibly differs from the base model's
(with the default scale, greedy answers change while staying mostly words; raise it to make
the difference louder). Test modules get the fixtures below through ``tests/unit/conftest.py``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import pytest

from service.bundled_model import HF_ID, default_cache_dir, model_dir

DEFAULT_SCALE = 0.3


def bundled_model_dir() -> Path:
    """Where ``make model`` leaves the bundled base model (``HYBRID_CACHE_DIR`` honoured)."""
    return model_dir(Path(os.environ.get("HYBRID_CACHE_DIR") or default_cache_dir()))


def make_lora_adapter(
    out_dir: Path,
    *,
    base_dir: Path,
    rank: int = 8,
    target_modules: Sequence[str] = ("q_proj", "v_proj"),
    scale: float = DEFAULT_SCALE,
    seed: int = 0,
) -> Path:
    """Save a real LoRA adapter for the model in ``base_dir`` into ``out_dir`` (the two PEFT files
    only), its config naming the Hugging Face id; ``seed`` makes the weights reproducible."""
    # Heavy imports stay here: collecting the test suite must not pay for torch.
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    torch.manual_seed(seed)  # lora_A's initialisation and lora_B's noise below
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=2 * rank, target_modules=list(target_modules), task_type="CAUSAL_LM"
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0.0, scale)
    peft_model.save_pretrained(str(out_dir), safe_serialization=True)
    (out_dir / "README.md").unlink(missing_ok=True)  # PEFT's model card: not part of an adapter
    config_path = out_dir / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    saved["base_model_name_or_path"] = HF_ID  # as if trained on the hub model, not a local path
    config_path.write_text(json.dumps(saved, indent=2))
    return out_dir


@pytest.fixture(scope="session")
def bundled_base_dir() -> Path:
    path = bundled_model_dir()
    if not (path / "model.safetensors").is_file():
        pytest.fail(f"the bundled model is missing at {path}: run `make model`")
    return path


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory: pytest.TempPathFactory, bundled_base_dir: Path) -> Path:
    """A real rank-8 adapter on q_proj and v_proj. Shared by the session: copy it to alter it."""
    return make_lora_adapter(tmp_path_factory.mktemp("lora") / "adapter", base_dir=bundled_base_dir)


@pytest.fixture(scope="session")
def other_lora_adapter(tmp_path_factory: pytest.TempPathFactory, bundled_base_dir: Path) -> Path:
    """Another real adapter (other seed, other modules): different weights, different sha256."""
    return make_lora_adapter(
        tmp_path_factory.mktemp("lora-other") / "adapter",
        base_dir=bundled_base_dir,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        seed=1,
    )
