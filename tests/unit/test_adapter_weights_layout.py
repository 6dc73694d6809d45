"""The layout of an adapter's weights file, checked by safetensors' own parser (the one vLLM loads
adapters with): a real adapter made on the bundled model, rewritten byte for byte with its
tensors' data gapped, overlapping, cut short, followed by stray bytes, or too small for a shape.

The hand-written header check this parser replaced let the first three through (each tensor's
range lay inside the file and matched its size), and vLLM refused them after registration."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save_file

from adapters.errors import AdapterValidationError
from adapters.validation import AdapterSpec, BaseModelInfo, validate_adapter
from service.bundled_model import HF_ID, SERVED_NAME
from tests.safetensors_layout import LAYOUTS, MESSAGES, rewritten

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


@pytest.fixture(scope="module")
def base(bundled_base_dir: Path) -> BaseModelInfo:
    return BaseModelInfo.from_model_dir(bundled_base_dir, SERVED_NAME, HF_ID)


@pytest.fixture
def adapter(tmp_path: Path, lora_adapter: Path) -> Path:
    """A private copy of the real adapter, free to break."""
    return Path(shutil.copytree(lora_adapter, tmp_path / "adapter"))


def validate(adapter: Path, base: BaseModelInfo) -> AdapterSpec:
    return validate_adapter((adapter / CONFIG).read_bytes(), adapter / WEIGHTS, base=base, max_rank=16)


def test_rewriting_the_layout_unchanged_keeps_a_valid_adapter(adapter: Path, base: BaseModelInfo) -> None:
    """So that each refusal below comes from the one thing its layout breaks."""
    (adapter / WEIGHTS).write_bytes(rewritten(adapter / WEIGHTS, lambda header, data: (header, data)))
    assert validate(adapter, base).rank == 8


@pytest.mark.parametrize("layout", LAYOUTS)
def test_weights_with_a_broken_layout_refused(adapter: Path, base: BaseModelInfo, layout: str) -> None:
    (adapter / WEIGHTS).write_bytes(rewritten(adapter / WEIGHTS, LAYOUTS[layout]))
    with pytest.raises(AdapterValidationError) as caught:
        validate(adapter, base)
    assert caught.value.param == "weights"
    assert "not a valid safetensors file" in caught.value.message
    assert MESSAGES[layout] in caught.value.message
    assert "safe_serialization=True" in caught.value.message


def test_bf16_weights_pass_without_their_data_being_read(adapter: Path, base: BaseModelInfo) -> None:
    """Only metadata is read (numpy, which the parser runs with here, has no bfloat16)."""
    tensors = load((adapter / WEIGHTS).read_bytes())  # not mmapped: the file is rewritten
    save_file({name: tensor.to(torch.bfloat16) for name, tensor in tensors.items()}, adapter / WEIGHTS)
    assert validate(adapter, base).rank == 8
