"""A small Dockerfile reader for the static checks of ``tests/unit/test_dockerfiles.py``:
instructions, stages, ARG defaults, ENV, exec-form lists, and the ``pip install`` runs of a stage
with the venv each installs into."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Instruction:
    keyword: str
    """Upper-cased: FROM, RUN, ENV..."""
    args: str
    """Everything after the keyword, continuation lines joined as Docker joins them."""


def parse(path: Path) -> list[Instruction]:
    """Every instruction of ``path``; comments and blank lines dropped, even inside a
    continuation (Docker drops them there too)."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1]
            continue
        keyword, _, args = (pending + line).partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
        pending = ""
    assert not pending, f"{path} ends inside a line continuation"
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """The instructions of each build stage, each list starting with its FROM."""
    found: list[list[Instruction]] = []
    for instruction in instructions:
        if instruction.keyword == "FROM":
            found.append([])
        if found:
            found[-1].append(instruction)
    return found


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM (the ones FROM lines may use)."""
    defaults: dict[str, str] = {}
    for instruction in instructions:
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            name, _, default = instruction.args.partition("=")
            defaults[name] = default
    return defaults


def substitute(text: str, variables: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables[m.group(1) or m.group(2)], text)


def base_images(path: Path) -> list[str]:
    """The image each stage starts from, ARG defaults resolved; earlier stages' names skipped."""
    instructions = parse(path)
    variables = global_args(instructions)
    names: set[str] = set()
    images: list[str] = []
    for instruction in instructions:
        if instruction.keyword != "FROM":
            continue
        words = [w for w in instruction.args.split() if not w.startswith("--")]  # --platform=...
        image = substitute(words[0], variables)
        if image not in names:
            images.append(image)
        if len(words) == 3 and words[1].lower() == "as":
            names.add(words[2])
    return images


def env(stage: list[Instruction]) -> dict[str, str]:
    """What the stage's ENV instructions set, in both the KEY=VALUE and the legacy KEY VALUE form."""
    values: dict[str, str] = {}
    for instruction in stage:
        if instruction.keyword != "ENV":
            continue
        words = shlex.split(instruction.args)
        if "=" not in words[0]:
            values[words[0]] = " ".join(words[1:])
            continue
        for word in words:
            key, _, value = word.partition("=")
            values[key] = value
    return values


def only(stage: list[Instruction], keyword: str) -> Instruction:
    """The stage's last ``keyword`` instruction (the one in force), which must exist."""
    matches = [i for i in stage if i.keyword == keyword]
    assert matches, f"no {keyword} in the stage starting with FROM {stage[0].args}"
    return matches[-1]


def exec_form(args: str) -> list[str]:
    words = json.loads(args)
    assert isinstance(words, list), f"not the exec form: {args}"
    return [str(word) for word in words]


def shell_commands(stage: list[Instruction]) -> list[str]:
    """Each ``&&``-separated command of the stage's RUN instructions, in order."""
    return [part.strip() for i in stage if i.keyword == "RUN" for part in i.args.split("&&")]


@dataclass(frozen=True)
class PipInstall:
    venv: str | None
    """The venv installed into (``/opt/venv`` for ``/opt/venv/bin/pip``); None for a bare ``pip``."""
    args: list[str]


def pip_runs(stage: list[Instruction]) -> list[PipInstall]:
    """Each ``pip install`` of the stage, in order, with the venv it installs into."""
    installs: list[PipInstall] = []
    for command in shell_commands(stage):
        words = shlex.split(command)
        if "install" not in words:
            continue
        pip = next((w for w in words[: words.index("install")] if w == "pip" or w.endswith("/bin/pip")), None)
        if pip is not None:
            venv = pip.removesuffix("/bin/pip") if pip != "pip" else None
            installs.append(PipInstall(venv, words[words.index("install") + 1 :]))
    return installs


def pip_installs(stage: list[Instruction]) -> list[list[str]]:
    """The arguments of each ``pip install`` of the stage, in order."""
    return [install.args for install in pip_runs(stage)]


def final_stage(path: Path) -> list[Instruction]:
    return stages(parse(path))[-1]


def option(words: list[str], name: str) -> str | None:
    """The value after ``name`` in an argument list (the last one, as argparse and pip take it)."""
    positions = [i for i, word in enumerate(words[:-1]) if word == name]
    return words[positions[-1] + 1] if positions else None
