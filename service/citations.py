"""Citations the gateway attaches when the model wrote none.

Small models answer from the sources but rarely write ``[n]`` (SmolLM2-135M cited nothing in
any of the prompt variants we tried). When an answer carries no marker, the gateway cites the
sources the answer draws on. What counts is what the answer adds to the question: its content
words (stop words left out, stemmed, numbers kept) that the question does not already hold. A
source is cited when it holds more than half of them. An answer that echoes the question and
makes up the rest ("delivery takes 2 hours" against a source saying 8 working days) shares
little with any source and gets no citation, which is the honest outcome.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import bm25s
import Stemmer

from service.protocol import ChatCompletion, ChatCompletionChunk

# More than half of what the answer adds is in the source: the answer restates it.
SUPPORT = 0.5
_MARKER = re.compile(r"\[(\d{1,2})\]")
_WORD = re.compile(r"(?u)\b\w+\b")
_STOP = frozenset(bm25s.stopwords.STOPWORDS_EN_PLUS)


def cites_any(answer: str, sources: int) -> bool:
    """The answer already has a ``[n]`` marker for one of the ``sources``."""
    return any(1 <= int(number) <= sources for number in _MARKER.findall(answer))


def supporting_sources(answer: str, sources: Sequence[str], question: str = "") -> list[int]:
    """1-based numbers of the sources holding more than :data:`SUPPORT` of what ``answer`` adds
    to ``question``."""
    stemmer = Stemmer.Stemmer("english")  # cheap to make; not shareable between threads
    added = _terms(answer, stemmer) - _terms(question, stemmer)
    if not added:
        return []
    return [
        number
        for number, text in enumerate(sources, start=1)
        if len(added & _terms(text, stemmer)) > SUPPORT * len(added)
    ]


def citation_suffix(answer: str, sources: Sequence[str], question: str = "") -> str:
    """What to append to ``answer``: ``" [1][3]"``, or nothing when it cites already or when no
    source supports it."""
    if not answer.strip() or cites_any(answer, len(sources)):
        return ""
    numbers = supporting_sources(answer, sources, question)
    return " " + "".join(f"[{number}]" for number in numbers) if numbers else ""


def _terms(text: str, stemmer: Stemmer.Stemmer) -> set[str]:
    words = [word for word in _WORD.findall(text.lower()) if word not in _STOP]
    return set(stemmer.stemWords(words))


class Citations:
    """Attaches citations to the choices of one answer, whole or streamed."""

    def __init__(self, sources: Sequence[str], question: str) -> None:
        self._sources = sources
        self._question = question
        self._streamed: dict[int, list[str]] = {}
        self._calling: set[int] = set()  # choices that call tools: no citation for them

    def attach(self, completion: ChatCompletion) -> ChatCompletion:
        choices = []
        for choice in completion.choices:
            if choice.message.tool_calls:  # a turn that calls tools is not an answer to cite
                choices.append(choice)
                continue
            content = choice.message.content or ""
            suffix = citation_suffix(content, self._sources, self._question)
            if suffix:
                message = choice.message.model_copy(update={"content": content + suffix})
                choice = choice.model_copy(update={"message": message})
            choices.append(choice)
        return completion.model_copy(update={"choices": choices})

    def follow(self, chunk: ChatCompletionChunk) -> ChatCompletionChunk:
        """Remember each choice's text; on its last chunk, add the citations to that chunk."""
        choices = []
        for choice in chunk.choices:
            text = self._streamed.setdefault(choice.index, [])
            if choice.delta.content:
                text.append(choice.delta.content)
            if choice.delta.tool_calls:
                self._calling.add(choice.index)
            if choice.finish_reason is not None and choice.index not in self._calling:
                suffix = citation_suffix("".join(text), self._sources, self._question)
                if suffix:
                    delta = choice.delta.model_copy(update={"content": (choice.delta.content or "") + suffix})
                    choice = choice.model_copy(update={"delta": delta})
            choices.append(choice)
        return chunk.model_copy(update={"choices": choices})
