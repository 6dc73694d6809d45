"""Where training runs and in what precision.

Weights stay in fp32 (the saved adapter too); the matrix products run in bf16 under autocast
where the hardware has bf16 units (CUDA, and CPUs with AVX-512 BF16 or AMX), which on the
2-core development machine makes a training step about 2.5 times faster. ``fp32`` turns that off.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Literal

Precision = Literal["auto", "fp32", "bf16"]


@dataclass(frozen=True)
class Placement:
    device: str
    """``cpu`` or ``cuda``."""
    bf16: bool

    @property
    def precision(self) -> str:
        return "bf16 autocast" if self.bf16 else "fp32"

    def autocast(self) -> AbstractContextManager[object]:
        import torch

        return torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.bf16)


def place(device: str, precision: Precision) -> Placement:
    """Resolve ``auto`` choices against this machine; refuse what it cannot do."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    has_bf16 = (
        torch.cuda.is_bf16_supported()
        if device == "cuda"
        else bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    )
    if precision == "bf16" and not has_bf16:
        raise ValueError(f"--precision bf16: this {device} has no bf16 support")
    return Placement(device, precision == "bf16" or (precision == "auto" and has_bf16))
