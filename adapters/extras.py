"""The optional parts of the install, and the check that a command's part is there.

The gateway runs without torch: ``pip install hybrid-serve`` brings no torch, transformers, peft,
sentence-transformers or matplotlib. The commands that need them say so at once, naming the extra
that brings them, instead of failing with an ImportError deep inside (see ``pyproject.toml``):

- ``model``: ``hybrid-serve model`` (the bundled model's GGUF conversion, the embedder's ONNX
  export) and the embedder's torch backend;
- ``train``: ``hybrid-serve adapters train``;
- ``plot``: the figure of ``hybrid-serve router eval``.
"""

from __future__ import annotations

import importlib


class MissingExtraError(ImportError):
    """A command needs packages of an extra that is not installed. The message is one line that
    names the extra; the CLI prints it as it is."""

    def __init__(self, what: str, extra: str, module: str, failure: str | None = None) -> None:
        state = "which is not installed" if failure is None else f"which fails to import ({failure})"
        super().__init__(f"{what} needs {module}, {state}: pip install 'hybrid-serve[{extra}]'", name=module)
        self.extra = extra


def require(extra: str, what: str, *modules: str) -> None:
    """Import each of ``modules`` (cached afterwards) or raise :class:`MissingExtraError`.

    Importing, not just finding, the module: a package present but broken (CUDA torchvision next
    to CPU torch) is as unusable as an absent one, and gets its own reason."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError as error:
            absent = isinstance(error, ModuleNotFoundError) and (
                error.name is not None and (module == error.name or module.startswith(f"{error.name}."))
            )
            failure = None if absent else (str(error).splitlines() or [type(error).__name__])[0]
            raise MissingExtraError(what, extra, module, failure) from None
