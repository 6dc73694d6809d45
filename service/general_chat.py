"""The bundled general-chat prompts: the router's ``base`` class before any operator labels
traffic (greetings, questions about the assistant, trivia, writing, maths, code, advice).

Written for this project, not taken from an evaluation set, and shipped inside the package so
that a fresh install routes with a ``base`` class out of the box."""

from __future__ import annotations

import functools
from importlib import resources

RESOURCE = "general_chat.txt"


@functools.cache
def general_chat_prompts() -> tuple[str, ...]:
    """One prompt per non-blank, non-comment line of ``service/data/general_chat.txt``."""
    text = resources.files("service").joinpath("data", RESOURCE).read_text(encoding="utf-8")
    lines = (line.strip() for line in text.splitlines())
    return tuple(dict.fromkeys(line for line in lines if line and not line.startswith("#")))
