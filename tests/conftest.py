"""Fixtures shared by every test tier: the real PEFT adapters of ``tests/adapter_factory.py``."""

from tests.adapter_factory import bundled_base_dir, lora_adapter, other_lora_adapter

__all__ = ["bundled_base_dir", "lora_adapter", "other_lora_adapter"]
