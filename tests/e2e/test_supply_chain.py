"""`hybrid-serve serve` refuses a model directory that could run code on load: it exits at once
with code 2 and says which file, and no engine is ever started (seconds, not the minutes a real
engine takes). The directory is the bundled model, linked file by file, plus one bad file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.harness import free_port

pytestmark = pytest.mark.e2e

REFUSED_WITHIN_S = 60.0  # mostly Python's imports on a busy machine; an engine needs minutes


def _auto_map(model: Path) -> str:
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_smol.SmolForCausalLM"}
    (model / "config.json").unlink()  # a link to the bundled model's: never write through it
    (model / "config.json").write_text(json.dumps(config))
    return "config.json"


def _modeling_file(model: Path) -> str:
    (model / "modeling_smol.py").write_text("import os\nos.system('echo pwned')\n")
    return "modeling_smol.py"


SPOILERS = {"auto-map-in-config": _auto_map, "python-file": _modeling_file}


@pytest.mark.parametrize("spoil", SPOILERS.values(), ids=SPOILERS.keys())
def test_serve_refuses_a_model_dir_carrying_code(
    tmp_path: Path, bundled_base_dir: Path, spoil: Callable[[Path], str]
) -> None:
    model = tmp_path / "smol"
    model.mkdir()
    for source in bundled_base_dir.iterdir():
        (model / source.name).symlink_to(source)
    offending = spoil(model)
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "HYBRID_MODEL_DIR": str(model),
        "HYBRID_DATA_DIR": str(data_dir),
        "HYBRID_PORT": str(free_port()),
        "HYBRID_ENGINE_PORT": str(free_port()),
    }
    env.pop("HYBRID_ENGINE_URL", None)

    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "service", "serve"],
        env=env,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=REFUSED_WITHIN_S * 2,
        check=False,
    )
    elapsed = time.monotonic() - started

    assert result.returncode == 2, result.stderr[-3000:]
    assert f"'{offending}'" in result.stderr
    assert str(model) in result.stderr
    assert "HYBRID_MODEL_DIR" in result.stderr
    assert elapsed < REFUSED_WITHIN_S
    assert not (data_dir / "logs" / "engine.log").exists()  # the engine was never started
