"""Fixtures shared by every test tier: the real PEFT adapters of ``tests/adapter_factory.py`` and
the real fine-tuning run of ``tests/training_factory.py``."""

from tests.adapter_factory import bundled_base_dir, lora_adapter, other_lora_adapter
from tests.training_factory import trained_banking

__all__ = ["bundled_base_dir", "lora_adapter", "other_lora_adapter", "trained_banking"]
