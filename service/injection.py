"""Screening retrieved passages for instructions aimed at the model (indirect prompt injection).

A passage is data, but a document can carry text written for the model that reads it ("ignore
all previous instructions", a forged ``<|im_start|>system`` turn, "reply only with ...", an
image whose URL would carry the conversation away). Such text is found by patterns, and the
sentence holding it is replaced with :data:`PLACEHOLDER` before the model sees the passage.

The unit is a sentence: the text is cut after ``.``, ``!`` or ``?`` followed by white space, and
at every line break. A forged role marker (``<|im_start|>``, ``<|system|>``, ``[INST]``,
``<<SYS>>``, a ``### System:`` heading, ``Assistant:`` at the start of a sentence) opens a turn
that a document has no business opening: its sentence and every following one are removed up to
a closing marker (``<|im_end|>``, ``[/INST]``, ``<</SYS>>``...) or a blank line.

The patterns are written for precision: over the 500 PubMedQA abstracts, conclusions and
questions and all 18,200 CLINC150 utterances they remove nothing
(``tests/unit/test_injection_corpora.py``). They are not complete: a paraphrase they do not
know passes, which is why this is one layer of several.
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from index.retrieval import Passage

PLACEHOLDER = "[instruction removed]"

_I = re.IGNORECASE
_IM = re.IGNORECASE | re.MULTILINE


def _any(*words: str) -> str:
    return "(?:" + "|".join(words) + ")"


# What an instruction to the model is about: its rules, its prompt, its secrets.
_RULES = _any(
    r"instructions?", r"prompts?", "rules", "directions", "directives", "guidelines", "guidance",
    "commands", "context", "messages", "programming", "constraints",
)  # fmt: skip
_EARLIER = _any(
    "previous", "prior", "above", "earlier", "preceding", "foregoing", "original", "initial",
    "system", "developer", "existing", "old",
)  # fmt: skip
_SECRET = _any(
    # "your password", "the secret code", "the internal verification code"
    r"(?:your|secret|hidden|internal|confidential|private|admin|the\s+assistant's)\s+(?:[\w-]+\s+)?"
    + _any(
        r"passwords?", r"passphrases?", r"passcodes?", r"pins?", r"keys?", r"tokens?", "credentials",
        r"codes?", r"prompts?", "instructions", "rules", r"secrets?",
    ),
    r"(?:system|initial|hidden|original|full)\s+(?:prompt|message|instructions)",
    r"(?:access|security|verification|canary)\s+codes?",
    r"api[ _-]?keys?",
)  # fmt: skip
_MODEL = _any(
    "ai", "assistant", "chatbot", r"chat\s*bot", r"language\s+model", "llm", "gpt", r"ai\s+assistant",
    r"ai\s+systems?", r"ai\s+models?",
)  # fmt: skip

PATTERNS: dict[str, tuple[re.Pattern[str], ...]] = {
    # A markdown image is fetched when the answer is rendered: a query string in its URL
    # carries data out. A link with a placeholder for data to fill in does the same on a click.
    "exfiltration": (
        re.compile(r"!\[[^\]\n]*\]\(\s*<?https?://[^)\s]*[?#=][^)\s]*\)", _I),
        re.compile(r"\]\(\s*<?https?://[^)\s]*(?:\{[^)\s]*\}|%7B|\$\{|<[A-Z_]+>|\[[A-Z_]+\])[^)\s]*\)", _I),
    ),
    # "Ignore all previous instructions", "disregard the above", "forget everything you were told".
    "override": (
        re.compile(
            r"\b(?:ignore|disregard|forget|override|bypass|discard)\s+"
            rf"(?:(?:all|any|every|each|of|the|your|these|those|my)\s+)*(?:{_EARLIER}\s+)+(?:{_RULES}|text|content|input)\b",
            _I,
        ),
        re.compile(
            r"\b(?:ignore|disregard|forget)\s+(?:everything|anything|all)\s+"
            r"(?:above|before|previous|prior|earlier|else|"
            r"you(?:'ve| have| were)\s+(?:been\s+)?(?:told|given|said))",
            _I,
        ),
        re.compile(
            rf"\b(?:ignore|disregard|forget|override|bypass)\s+(?:all\s+)?(?:your|the\s+assistant's)\s+{_RULES}\b",
            _I,
        ),
        re.compile(
            r"\b(?:new|updated|revised|real|actual|hidden|secret|override)\s+(?:system\s+)?(?:instructions\b|instruction\s*:)",
            _I,
        ),
        re.compile(r"\bnew\s+(?:system\s+prompt|rules?\s*:)", _I),
    ),
    # Talking to the model about itself: "you are now", "act as", "as the assistant you must".
    "persona": (
        # At a sentence's start: "would you say that you are now a pet owner" asks something else.
        re.compile(r"(?:^|[.!?:;,\]>]\s*)you\s+are\s+now\b|\byou\s+are\s+no\s+longer\b", _IM),
        re.compile(
            r"(?:^|[.!?:]\s+)(?:please\s+)?(?:act|behave|pretend|roleplay)\s+(?:as|like|to\s+be)\b", _IM
        ),
        re.compile(
            r"\byou\s+(?:must|should|will|shall|are\s+to|need\s+to|have\s+to)\s+(?:now\s+)?(?:act|behave|pretend)\b",
            _I,
        ),
        re.compile(r"\bpretend\s+(?:that\s+)?you\s+are\b", _I),
        re.compile(
            r"\b(?:from\s+(?:now|this\s+point)\s+on|henceforth)\b[^.!?\n]{0,20}\b(?:act|behave|pretend)\b", _I
        ),
        re.compile(
            rf"\b(?:dear|attention|note\s+to(?:\s+the)?|as\s+the)\s+{_MODEL}\b"
            r"|\bas\s+an?\s+(?:ai|chatbot|language\s+model|llm|ai\s+assistant)\b",
            _I,
        ),
        re.compile(
            r"\b(?:the|any|all)\s+(?:ai|assistant|chatbot|language\s+model|llm)s?\s+"
            r"(?:must|should|shall|is\s+(?:required|instructed)\s+to|needs?\s+to|will\s+now)\b",
            _I,
        ),
        re.compile(r"\b(?:jailbreak|jailbroken|developer\s+mode|DAN\s+mode|do\s+anything\s+now)\b", _I),
    ),
    # What the answer must be: "reply only with ACCESS GRANTED", "every answer must start with".
    "answer": (
        re.compile(
            r"\b(?:reply|respond|answer|say|output|write|print)\s+(?:only|just|solely|exclusively|nothing\s+but)\s+"
            r"(?:with|the|in|a|\")",
            _I,
        ),
        re.compile(
            r"\b(?:reply|respond|answer)\s+with\s+(?:only|just|exactly|the\s+(?:word|words|phrase|text|string))\b",
            _I,
        ),
        re.compile(
            r"\b(?:every|each|your)\s+(?:reply|response|answer|message)\s+(?:must|should|shall|has\s+to)\s+"
            r"(?:be|begin|start|end|contain|include)\b",
            _I,
        ),
        re.compile(
            r"\b(?:do\s+not|don't|never)\s+(?:tell|inform|warn|mention\s+(?:this\s+)?to)\s+the\s+user\b", _I
        ),
    ),
    # Asking for what the model was told: "print your system prompt", "output the secret password".
    "reveal": (
        re.compile(
            r"\b(?:reveal|print|repeat|output|disclose|leak|recite|display|dump|expose|echo|show|tell|give|send|"
            rf"share|include|insert|append|write)\b[^.!?\n]{{0,60}}?\b{_SECRET}\b",
            _I,
        ),
        re.compile(r"\bsystem\s+prompts?\b", _I),
        re.compile(
            r"\b(?:repeat|print|output|recite)\s+(?:everything|all|the\s+(?:text|words))\s+(?:above|before)\b",
            _I,
        ),
    ),
}

# Forged chat-template and role markers: each opens a turn that runs to a closing marker or a
# blank line. ("System:" alone starts many a spec sheet line, so it counts only before an order.)
_TEMPLATE_OPENING = (
    r"<\|\s*(?:im_start|system|user|assistant|start_header_id|begin_of_text|startoftext|im_sep)\s*\|>"
    r"|\[\s*INST\s*\]|<<\s*SYS\s*>>"
)
_OPENING = re.compile(
    _TEMPLATE_OPENING + r"|^\s*#{1,6}\s*(?:system|assistant)\b|^\s*#{1,6}\s*(?:instruction|response)\s*:"
    r"|^\s*(?:assistant|ai)\s*:"
    r"|^\s*system\s*(?:prompt|message|instructions?)?\s*:\s*"
    r"(?:you|ignore|disregard|forget|new|from\s+now|always|never|do|reply|respond|answer|print|reveal|output)\b",
    _IM,
)
_CLOSING = re.compile(
    r"<\|\s*(?:im_end|eot_id|end|endoftext|end_header_id|eos)\s*\|>|\[\s*/\s*INST\s*\]|<<\s*/\s*SYS\s*>>", _I
)
# A sentence ends after . ! or ? followed by spaces or tabs, at every line break, after a
# closing marker, and before a template's opening marker (which then starts the next one).
_BOUNDARY = re.compile(
    rf"(?P<closing>{_CLOSING.pattern})|(?P<opening>{_TEMPLATE_OPENING})|(?<=[.!?])[ \t]+|\n", re.IGNORECASE
)
_ROLE_MARKER = "role_marker"


@dataclass(frozen=True)
class Screened:
    """A text as the model will see it, and how many sentences were removed, by kind."""

    text: str
    removed: Counter[str] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.removed.values())


def screen_text(text: str) -> Screened:
    """``text`` with every sentence that holds an instruction to the model replaced by
    :data:`PLACEHOLDER` (consecutive ones share one placeholder)."""
    removed: Counter[str] = Counter()
    out: list[str] = []
    in_turn = False  # inside a forged role turn
    for sentence, gap in _split(text):
        kind: str | None = None
        if sentence.strip():
            if in_turn or _OPENING.search(sentence):
                kind = _ROLE_MARKER
                in_turn = not _CLOSING.search(sentence)
            else:
                kind = instruction_kind(sentence) or (_ROLE_MARKER if _CLOSING.search(sentence) else None)
        if "\n\n" in gap.replace(" ", "").replace("\t", ""):
            in_turn = False  # a blank line ends a forged turn
        if kind is None:
            out.append(sentence + gap)
            continue
        removed[kind] += 1
        if out and out[-1].startswith(PLACEHOLDER) and not out[-1][len(PLACEHOLDER) :].strip():
            out[-1] = PLACEHOLDER + gap  # the one before was removed too: one placeholder for both
        else:
            out.append(PLACEHOLDER + gap)
    return Screened("".join(out), removed)


def screen_passage(passage: Passage) -> tuple[Passage, Counter[str]]:
    """``passage`` with its text, title and heading screened, and what was removed, by kind."""
    removed: Counter[str] = Counter()
    screened_fields: dict[str, Any] = {}  # of Passage's str fields only
    for name in ("text", "title", "heading"):
        value = getattr(passage, name)
        if value:
            screened = screen_text(value)
            removed.update(screened.removed)
            screened_fields[name] = screened.text
    if not removed:
        return passage, removed
    return dataclasses.replace(passage, **screened_fields), removed


def instruction_kind(sentence: str) -> str | None:
    """The kind of the first pattern that ``sentence`` matches, or None."""
    for kind, patterns in PATTERNS.items():
        if any(pattern.search(sentence) for pattern in patterns):
            return kind
    return None


def _split(text: str) -> list[tuple[str, str]]:
    """``text`` as (sentence, the white space after it) pairs; joined, they give ``text`` back."""
    parts: list[tuple[str, str]] = []
    start = 0
    for match in _BOUNDARY.finditer(text):
        if match.start() < start:
            continue  # inside the white space already taken
        if match.group("opening") is not None:
            end = gap_end = match.start()  # the marker begins the next sentence
            if end == start:
                continue
        elif match.group("closing") is not None:
            end = gap_end = match.end()  # the marker ends this one
        else:
            end, gap_end = match.start(), match.end()
        while gap_end < len(text) and text[gap_end] in " \t\n":
            gap_end += 1
        parts.append((text[start:end], text[end:gap_end]))
        start = gap_end
    if start < len(text) or not parts:
        parts.append((text[start:], ""))
    return parts
