"""The supply-chain check on model directories (``adapters/model_files.py``), on small directories
built here, and where it is applied: the local engine's command line and the directories
``serve`` would load. Deploy files and the launcher never ask vLLM to trust a model's code."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import yaml

from adapters.model_files import (
    FileProblem,
    UnsafeModelError,
    check_model_dir,
    find_problems,
    refused_file_reason,
    remote_code_keys,
)
from index.embedder import bundled_embedder_path
from service.app import build_app
from service.launcher import model_dirs_problem, vllm_command
from service.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[2]
ST_MODULES = [
    {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
]


def model(tmp_path: Path, files: Mapping[str, str | bytes] | None = None, *, name: str = "model") -> Path:
    """A model directory with a config, a tokenizer config and safetensors weights (their bytes
    do not matter: nothing is loaded), plus ``files`` (relative path -> content)."""
    directory = tmp_path / name
    directory.mkdir()
    base: dict[str, str | bytes] = {
        "config.json": json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}),
        "tokenizer_config.json": json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}),
        "model.safetensors": b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ",
    }
    for relative, content in {**base, **(files or {})}.items():
        path = directory / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return directory


def refused(directory: Path) -> dict[str, str]:
    """Refused path -> reason."""
    return {problem.path: problem.reason for problem in find_problems(directory)}


# ---------------------------------------------------------------------------- accepted


def test_a_plain_safetensors_model_is_accepted(tmp_path: Path) -> None:
    directory = model(
        tmp_path,
        {
            "generation_config.json": "{}",
            "tokenizer.json": "{}",
            "chat_template.jinja": "{{ messages }}",
            "README.md": "# model",
            "model-00001-of-00002.safetensors": b"",
            "model.safetensors.index.json": "{}",
            "onnx/model.onnx": b"",
            "arrays.npy": b"",
        },
    )
    assert find_problems(directory) == []
    check_model_dir(directory)  # no error


def test_the_bundled_models_are_accepted(bundled_base_dir: Path) -> None:
    assert find_problems(bundled_base_dir) == []
    assert find_problems(bundled_embedder_path()) == []


def test_remote_code_off_in_a_config_is_accepted(tmp_path: Path) -> None:
    config = json.dumps({"model_type": "llama", "trust_remote_code": False, "auto_map": None})
    assert find_problems(model(tmp_path, {"config.json": config})) == []


def test_a_link_to_a_file_elsewhere_is_accepted(tmp_path: Path) -> None:
    """As in a Hugging Face cache snapshot, whose files link into the repository's blobs."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "9f2c1e").write_bytes(b"weights")
    directory = model(tmp_path)
    (directory / "model.safetensors").unlink()
    (directory / "model.safetensors").symlink_to(blobs / "9f2c1e")
    (directory / "inner").symlink_to(directory / "config.json")
    assert find_problems(directory) == []


# ---------------------------------------------------------------------------- remote code


@pytest.mark.parametrize(
    "config_file",
    ["config.json", "tokenizer_config.json", "adapter_config.json", "preprocessor_config.json"],
)
def test_auto_map_in_any_config_is_refused(tmp_path: Path, config_file: str) -> None:
    auto_map = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    directory = model(tmp_path, {config_file: json.dumps({"model_type": "evil", "auto_map": auto_map})})
    reason = refused(directory)[config_file]
    assert "auto_map" in reason
    assert "trust_remote_code" in reason


@pytest.mark.parametrize(
    ("config", "key"),
    [
        ({"custom_pipelines": {"evil": {"impl": "pipeline_evil.Evil"}}}, "custom_pipelines"),
        ({"trust_remote_code": True}, "trust_remote_code"),
        # sentence-transformers passes model_args on to transformers.
        ({"model_args": {"trust_remote_code": True}}, "model_args.trust_remote_code"),
        ({"text_config": {"auto_map": {"AutoModel": "m.M"}}}, "text_config.auto_map"),
    ],
)
def test_other_requests_for_custom_code_are_refused(
    tmp_path: Path, config: dict[str, object], key: str
) -> None:
    directory = model(tmp_path, {"sentence_bert_config.json": json.dumps(config)})
    assert f"sets {key}," in refused(directory)["sentence_bert_config.json"]


def test_a_custom_sentence_transformers_module_is_refused(tmp_path: Path) -> None:
    modules = [*ST_MODULES, {"idx": 2, "name": "2", "path": "2_Evil", "type": "evil_module.Evil"}]
    directory = model(tmp_path, {"modules.json": json.dumps(modules)})
    assert "'evil_module.Evil'" in refused(directory)["modules.json"]
    assert find_problems(model(tmp_path, {"modules.json": json.dumps(ST_MODULES)}, name="plain")) == []


@pytest.mark.parametrize("name", ["modeling_evil.py", "sub/dir/helper.py", "__pycache__/x.cpython-311.pyc"])
def test_python_files_anywhere_are_refused(tmp_path: Path, name: str) -> None:
    directory = model(tmp_path, {name: "import os; os.system('echo pwned')"})
    assert "is Python code" in refused(directory)[name]


def test_remote_code_keys_lists_every_offending_path() -> None:
    config: dict[str, object] = {
        "auto_map": {},
        "layers": [{"trust_remote_code": 1}, {"trust_remote_code": 0}],
        "custom_pipelines": None,
        "name": "auto_map",
    }
    assert remote_code_keys(config) == ["auto_map", "layers.0.trust_remote_code"]
    assert remote_code_keys([1, "auto_map"]) == []


# ---------------------------------------------------------------------------- weights


@pytest.mark.parametrize(
    "name",
    [
        "pytorch_model.bin",
        "training_args.bin",
        "model.pt",
        "MODEL.PTH",
        "last.ckpt",
        "state.pkl",
        "state.pickle",
        "scaler.joblib",
        "checkpoint-10/optimizer.pt",
    ],
)
def test_pickle_weights_are_refused_even_beside_safetensors(tmp_path: Path, name: str) -> None:
    directory = model(tmp_path, {name: b"\x80\x04\x95"})
    reason = refused(directory)[name]
    assert "pickle" in reason
    assert "safetensors" in reason


@pytest.mark.parametrize(("name", "says"), [("tf_model.h5", "Keras"), ("model.Q4_1.gguf", "GGUF")])
def test_other_loaders_formats_are_refused(tmp_path: Path, name: str, says: str) -> None:
    assert says in refused(model(tmp_path, {name: b"\x00"}))[name]


def test_a_directory_without_safetensors_is_refused(tmp_path: Path) -> None:
    directory = model(tmp_path)
    (directory / "model.safetensors").unlink()
    assert "no *.safetensors" in refused(directory)["."]
    assert find_problems(directory, require_safetensors=False) == []


def test_refused_file_reason_goes_by_suffix() -> None:
    assert refused_file_reason("adapter_model.safetensors") is None
    assert refused_file_reason("config.json") is None
    assert refused_file_reason("README") is None
    assert "pickle" in (refused_file_reason("adapter_model.BIN") or "")


# ---------------------------------------------------------------------------- links and odd files


def test_a_link_to_a_directory_outside_is_refused(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "modeling_evil.py").write_text("import os")
    directory = model(tmp_path)
    (directory / "code").symlink_to(outside, target_is_directory=True)
    assert "outside" in refused(directory)["code"]


def test_a_link_disguising_a_refused_file_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "evil.bin"
    elsewhere.write_bytes(b"\x80\x04")
    directory = model(tmp_path)
    (directory / "extra.safetensors").symlink_to(elsewhere)
    reason = refused(directory)["extra.safetensors"]
    assert "evil.bin" in reason
    assert "pickle" in reason


def test_a_dangling_link_is_refused(tmp_path: Path) -> None:
    directory = model(tmp_path)
    (directory / "tokenizer.json").symlink_to(tmp_path / "gone")
    assert "to nothing" in refused(directory)["tokenizer.json"]


def test_a_pipe_is_refused_and_never_read(tmp_path: Path) -> None:
    directory = model(tmp_path)
    os.mkfifo(directory / "extra_config.json")  # reading it would block
    assert "not a regular file" in refused(directory)["extra_config.json"]


def test_a_missing_directory_is_refused(tmp_path: Path) -> None:
    assert find_problems(tmp_path / "nowhere") == [FileProblem(".", "is not a directory")]


# ---------------------------------------------------------------------------- the error


def test_the_error_names_every_file_and_the_directory(tmp_path: Path) -> None:
    directory = model(
        tmp_path,
        {"modeling_evil.py": "", "pytorch_model.bin": b"", "config.json": '{"auto_map": {}}'},
    )
    with pytest.raises(UnsafeModelError) as error:
        check_model_dir(directory, what="base model")
    message = str(error.value)
    assert message.startswith(f"refusing to load the base model in {directory}: ")
    for name in ("modeling_evil.py", "pytorch_model.bin", "config.json"):
        assert f"'{name}'" in message
    assert [p.path for p in error.value.problems] == ["config.json", "modeling_evil.py", "pytorch_model.bin"]
    assert isinstance(error.value, ValueError)  # callers that handle bad input catch it


def test_the_error_counts_what_it_does_not_list(tmp_path: Path) -> None:
    directory = model(tmp_path, {f"m{i}.py": "" for i in range(8)})
    with pytest.raises(UnsafeModelError, match=r"; and 3 more$"):
        check_model_dir(directory)


# ---------------------------------------------------------------------------- where it is applied


def test_serve_refuses_an_unsafe_model_dir(tmp_path: Path) -> None:
    directory = model(tmp_path, {"modeling_evil.py": ""})
    problem = model_dirs_problem(Settings(model_dir=directory, cache_dir=tmp_path / "cache"))
    assert problem is not None
    assert "modeling_evil.py" in problem
    assert problem.endswith("(HYBRID_MODEL_DIR)")


@pytest.mark.parametrize("setting", ["base_model_dir", "embedder_dir"])
def test_serve_refuses_other_unsafe_model_dirs(tmp_path: Path, setting: str) -> None:
    directory = model(tmp_path, {"pytorch_model.bin": b""})
    overrides: dict[str, Any] = {setting: directory}
    settings = Settings(**overrides, model_dir=model(tmp_path, name="engine"))
    problem = model_dirs_problem(settings)
    assert problem is not None
    assert "pytorch_model.bin" in problem
    assert problem.endswith(f"(HYBRID_{setting.upper()})")


def test_serve_accepts_safe_dirs_and_an_unbuilt_bundled_model(tmp_path: Path) -> None:
    assert (
        model_dirs_problem(Settings(model_dir=model(tmp_path), embedder_dir=bundled_embedder_path())) is None
    )
    assert model_dirs_problem(Settings(cache_dir=tmp_path / "empty-cache")) is None


def test_an_external_engines_model_dir_is_not_ours_to_check(tmp_path: Path) -> None:
    directory = model(tmp_path, {"modeling_evil.py": ""})
    assert model_dirs_problem(Settings(engine_url="http://vllm:8000", model_dir=directory)) is None


def test_the_built_bundled_model_is_checked(tmp_path: Path, bundled_base_dir: Path) -> None:
    cache = tmp_path / "cache"
    copy = cache / bundled_base_dir.name
    shutil.copytree(bundled_base_dir, copy, ignore=shutil.ignore_patterns("*.safetensors"))
    (copy / "model.safetensors").symlink_to(bundled_base_dir / "model.safetensors")
    assert model_dirs_problem(Settings(cache_dir=cache)) is None
    (copy / "modeling_llama.py").write_text("")
    assert "(the bundled model)" in (model_dirs_problem(Settings(cache_dir=cache)) or "")


async def test_the_app_refuses_an_unsafe_local_model_without_the_cli(tmp_path: Path) -> None:
    """The lifespan checks the engine's directory itself, before any engine or client starts."""
    directory = model(tmp_path, {"modeling_evil.py": ""})
    app = build_app(Settings(model_dir=directory, data_dir=tmp_path / "data"))
    with pytest.raises(UnsafeModelError, match=r"'modeling_evil\.py'"):
        async with app.router.lifespan_context(app):
            pytest.fail("the gateway started")
    assert not (tmp_path / "data" / "logs").exists()  # no engine was ever started


def test_fine_tuning_refuses_an_unsafe_base_model_before_loading_it(tmp_path: Path) -> None:
    from adapters.fine_tune import TrainRequest, fine_tune

    base = model(tmp_path, {"pytorch_model.bin": b"\x80\x04\x95"})
    request = TrainRequest(
        train_file=tmp_path / "train.jsonl", name="x", output=tmp_path / "out", base_model=base
    )
    with pytest.raises(UnsafeModelError, match=r"base model .*'pytorch_model\.bin'"):
        fine_tune(request)
    assert not (tmp_path / "out").exists()


def test_the_engine_loads_safetensors_only_and_never_remote_code(tmp_path: Path) -> None:
    command = vllm_command(Settings(), tmp_path, "m")
    assert command[command.index("--load-format") + 1] == "safetensors"
    assert not any("trust" in part.replace("_", "-") for part in command)


def test_no_deploy_file_or_launcher_trusts_remote_code() -> None:
    files = [
        PROJECT_ROOT / "service" / "launcher.py",
        PROJECT_ROOT / "Dockerfile",
        *sorted((PROJECT_ROOT / "deploy").rglob("*")),
    ]
    checked = [f for f in files if f.is_file() and f.suffix != ".md"]
    assert len(checked) > 5
    for path in checked:
        text = path.read_text().replace("_", "-").lower()
        assert "trust-remote-code" not in text, f"{path.relative_to(PROJECT_ROOT)} trusts remote code"


def deployed_vllm_arguments() -> dict[str, list[str]]:
    """File -> the arguments of each vLLM it starts (the image's, whatever the entrypoint)."""
    found: dict[str, list[str]] = {}
    compose = yaml.safe_load((PROJECT_ROOT / "deploy" / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        if str(service.get("image", "")).startswith("vllm/vllm-openai"):
            found[f"compose.yaml:{name}"] = [str(a) for a in service["command"]]
    for path in sorted((PROJECT_ROOT / "deploy" / "kubernetes").glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            pod = ((document or {}).get("spec") or {}).get("template", {}).get("spec", {})
            for container in pod.get("containers", []):
                if str(container.get("image", "")).startswith("vllm/vllm-openai"):
                    found[f"{path.name}:{container['name']}"] = [str(a) for a in container.get("args", [])]
    return found


def test_deployed_engines_load_safetensors_only() -> None:
    engines = deployed_vllm_arguments()
    assert set(engines) == {"compose.yaml:vllm", "vllm.yaml:vllm"}
    for where, args in engines.items():
        assert args.count("--load-format") == 1, where
        assert args[args.index("--load-format") + 1] == "safetensors", where
