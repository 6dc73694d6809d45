"""The knobs of a training run, with the defaults a LoRA fine-tune of a small model starts from."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from adapters.device import Precision

# Every linear layer of a Llama-style block: adapting the MLP as well as attention learns a task
# in fewer steps than q/v alone, for a few more parameters (all of which vLLM serves).
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class TrainConfig:
    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    """Off by default: early stopping on validation loss already guards against overfitting, and
    PEFT's per-module dropout copies make a CPU step about 1.5 times slower."""
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    learning_rate: float = 2e-4
    epochs: float = 2.0
    batch_size: int = 8
    gradient_accumulation: int = 1
    warmup_fraction: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    max_length: int = 1024
    """Rows whose rendered conversation is longer (in tokens) are removed, not truncated."""
    eval_steps: int | None = None
    """Optimizer steps between validations; None: four times an epoch."""
    patience: int = 3
    """Validations without a new best validation loss before training stops."""
    min_delta: float = 0.0
    """How much lower a validation loss must be to count as better."""
    validation_fraction: float = 0.2
    seed: int = 0
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda``."""
    precision: Precision = "auto"
    """``auto`` (bf16 autocast where the hardware has it), ``bf16`` or ``fp32``."""

    def __post_init__(self) -> None:
        checks = {
            "rank": self.rank >= 1,
            "alpha": self.alpha > 0,
            "dropout": 0 <= self.dropout < 1,
            "learning_rate": self.learning_rate > 0,
            "epochs": self.epochs > 0,
            "batch_size": self.batch_size >= 1,
            "gradient_accumulation": self.gradient_accumulation >= 1,
            "warmup_fraction": 0 <= self.warmup_fraction < 1,
            "max_length": self.max_length >= 8,
            "eval_steps": self.eval_steps is None or self.eval_steps >= 1,
            "patience": self.patience >= 1,
            "validation_fraction": 0 < self.validation_fraction < 1,
            "device": self.device in {"auto", "cpu", "cuda"},
            "precision": self.precision in {"auto", "bf16", "fp32"},
            "target_modules": bool(self.target_modules),
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training settings: {', '.join(bad)}")

    @property
    def effective_batch(self) -> int:
        return self.batch_size * self.gradient_accumulation

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["target_modules"] = list(self.target_modules)
        return data
