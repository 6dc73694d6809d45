"""Keeping the secrets of a request's system prompt out of its answers.

The gateway knows each request's system and developer messages. What in them looks like a
credential is a **secret**, found by two rules:

1. a run of at least :data:`MIN_TOKEN` characters from ``[A-Za-z0-9_-]`` holding at least one
   letter and one digit (API keys, tokens, ``CANARY-3f9a1b2c4d5e``, ``SPRING24X``), and each of
   its ``-`` or ``_`` separated parts that is one too (``3f9a1b2c4d5e``: the part that matters);
2. the value after a credential word (``password``, ``passphrase``, ``passcode``, ``pin``,
   ``secret``, ``token``, ``api key``, ``access key``, ``secret key``, ``access code``,
   ``secret code``, ``security code``, ``verification code``, ``canary code``, ``internal code``)
   followed by ``is``, ``:`` or ``=``, or after plain ``key`` or ``code`` followed by ``:`` or
   ``=``: the quoted text, or else the next run of non-space characters without its trailing
   punctuation; at least :data:`MIN_VALUE` characters and not a common English word
   ("The password is swordfish" → ``swordfish``; "The secret is safe" → nothing).

Every occurrence of a secret in an answer, in any letter case, becomes :data:`REDACTED`
(overlapping occurrences of several secrets become one), and so does the beginning of a secret
when it is at least half of it and :data:`FRAGMENT` characters long: small models copy a secret
and then drift (``CANARY-3f9a1b2c4d5b8b`` for ``CANARY-3f9a1b2c4d5e``), and ``max_tokens`` may
cut one short. A stream holds back the last (longest secret − 1) characters of each choice, so
a secret split across chunks is caught, and releases them on the choice's last chunk.

Limits: a secret that looks like neither (a plain word with no credential word before it) is
not known; a secret the model spells differently (spaces between its characters, translated,
encoded) is not caught.

:func:`redact_prompt` applies the same two rules to a user's prompt before the traffic log
keeps it, and also replaces e-mail addresses (:data:`EMAIL`) and numbers of 7 digits or more,
spaces, dots, dashes and brackets allowed between them (:data:`NUMBER`: phone, card, account
numbers; an ISO date is left alone).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from service.protocol import (
    ChatCompletion,
    ChatCompletionChunk,
    ChunkChoice,
    Delta,
    FunctionCallDelta,
    ResponseMessage,
    ToolCallDelta,
)

REDACTED = "[redacted]"
EMAIL = "[email]"
NUMBER = "[number]"
MIN_TOKEN = 8
MIN_VALUE = 4
FRAGMENT = 8
MAX_VALUE = 128

_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_LETTER = re.compile(r"[A-Za-z]")
_DIGIT = re.compile(r"[0-9]")
_VALUE = r"""(?:"([^"\n]+)"|'([^'\n]+)'|“([^”\n]+)”|‘([^’\n]+)’|`([^`\n]+)`|([^\s"'`“”‘’]+))"""
_STRONG = (
    r"passwords?|passphrases?|passcodes?|pins?|secrets?|tokens?|api[ _-]?keys?|"
    r"(?:access|secret|private)[ _-]?keys?|"
    r"(?:access|secret|security|verification|canary|internal)[ _-]?codes?"
)
_KEYWORD_VALUE = re.compile(
    rf"\b(?:(?:{_STRONG})\s*(?:is|was|:|=)|(?:keys?|codes?)\s*[:=])\s*{_VALUE}",
    re.IGNORECASE,
)
_TRAILING_PUNCTUATION = ".,;:!?)]}>"
# Words that follow "the password is" in prose rather than a password.
_NOT_VALUES = frozenset(
    (
        "that", "this", "these", "those", "there", "here", "what", "which", "when", "where", "whatever",
        "never", "always", "only", "also", "just", "still", "already", "then", "soon", "safe", "secret",
        "hidden", "private", "confidential", "sensitive", "secure", "protected", "important", "required",
        "needed", "optional", "necessary", "mandatory", "unknown", "unset", "empty", "blank", "none", "null",
        "missing", "provided", "given", "shown", "stored", "kept", "used", "valid", "invalid", "correct",
        "wrong", "same", "different", "below", "above", "being", "with", "from", "into", "your", "their",
        "ours", "yours", "mine", "theirs",
    )
)  # fmt: skip


_EMAIL = re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# A digit, then 6 or more digits each after at most two separators ("+1 (415) 555-0134",
# "4111 1111 1111 1111"); not inside a word or a decimal ("v1.2", "3.14159").
_NUMBER = re.compile(r"(?<![\w.])\+?\(?\d(?:[\s().-]{0,2}\d){6,}(?![\w])")
_ISO_DATE = re.compile(r"\d{4}-\d{2}-\d{2}")


def redact_prompt(text: str) -> str:
    """``text`` with e-mail addresses, long numbers and credential-looking tokens replaced (what
    the traffic log keeps of a prompt)."""
    text = _EMAIL.sub(EMAIL, text)
    text = _NUMBER.sub(lambda m: m.group() if _ISO_DATE.fullmatch(m.group()) else NUMBER, text)
    redactor = SecretRedactor.for_messages([text])
    return redactor.redact(text)[0] if redactor is not None else text


def find_secrets(texts: Iterable[str]) -> list[str]:
    """The secrets of ``texts`` (the system and developer messages), longest first."""
    found: dict[str, str] = {}
    for text in texts:
        for run in _TOKEN.findall(text):
            for token in {run, *re.split(r"[-_]+", run)}:
                if len(token) >= MIN_TOKEN and _LETTER.search(token) and _DIGIT.search(token):
                    found.setdefault(token.casefold(), token)
        for match in _KEYWORD_VALUE.finditer(text):
            quoted = next((group for group in match.groups()[:-1] if group is not None), None)
            value = quoted.strip() if quoted is not None else match.group(6).rstrip(_TRAILING_PUNCTUATION)
            if MIN_VALUE <= len(value) <= MAX_VALUE and value.casefold() not in _NOT_VALUES:
                found.setdefault(value.casefold(), value)
    return sorted(found.values(), key=lambda secret: (-len(secret), secret))


class SecretRedactor:
    """Replaces the given secrets in text; ``longest`` says how much a stream must hold back."""

    def __init__(self, secrets: Sequence[str]) -> None:
        if not secrets:
            raise ValueError("a redactor needs at least one secret")
        ordered = sorted(set(secrets), key=lambda secret: (-len(secret), secret))
        self.secrets = tuple(ordered)
        self.longest = len(ordered[0])
        # One pattern per secret: the secret, or its longest prefix of at least FRAGMENT
        # characters, at every position (a lookahead finds overlapping occurrences too).
        self._patterns = [re.compile(f"(?=({_prefixes(secret)}))", re.IGNORECASE) for secret in ordered]

    @classmethod
    def for_messages(cls, texts: Iterable[str]) -> SecretRedactor | None:
        """A redactor for the secrets of ``texts``, or None when they hold none."""
        secrets = find_secrets(texts)
        return cls(secrets) if secrets else None

    def redact(self, text: str) -> tuple[str, int]:
        """``text`` with every secret (and long fragment of one) replaced, and how many
        replacements were made."""
        return _replace(text, self._spans(text))

    def release(self, pending: str) -> tuple[str, str, int]:
        """What a stream may send of ``pending`` now (redacted), what it must hold back, and how
        many redactions were made: a secret starting in the last ``longest - 1`` characters may
        still be incomplete."""
        cut = len(pending) - (self.longest - 1)
        if cut <= 0:
            return "", pending, 0
        spans = self._spans(pending)
        for start, end in spans:
            if start < cut < end:
                cut = end  # a whole occurrence straddles the cut: send it, redacted
                break
        sent, count = _replace(pending[:cut], [span for span in spans if span[1] <= cut])
        return sent, pending[cut:], count

    def _spans(self, text: str) -> list[tuple[int, int]]:
        """Where secrets occur in ``text``, overlapping occurrences merged, in order."""
        found = sorted(match.span(1) for pattern in self._patterns for match in pattern.finditer(text))
        spans: list[tuple[int, int]] = []
        for start, end in found:
            if spans and start <= spans[-1][1]:
                spans[-1] = (spans[-1][0], max(spans[-1][1], end))
            else:
                spans.append((start, end))
        return spans

    # -- answers

    def completion(self, completion: ChatCompletion) -> tuple[ChatCompletion, int]:
        """``completion`` with its choices' secrets redacted; a redacted choice loses its
        logprobs (their tokens spell the secret out)."""
        total = 0
        choices = []
        for choice in completion.choices:
            message, count = self._message(choice.message)
            if count:
                total += count
                choice = choice.model_copy(update={"message": message, "logprobs": None})
            choices.append(choice)
        return completion.model_copy(update={"choices": choices}), total

    def _message(self, message: ResponseMessage) -> tuple[ResponseMessage, int]:
        """The message's text and its tool calls' arguments redacted (a secret inside a JSON
        string stays a valid string: the marker has no quote)."""
        update: dict[str, object] = {}
        total = 0
        if message.content:
            update["content"], total = self.redact(message.content)
        if message.tool_calls:
            calls = []
            for call in message.tool_calls:
                arguments, count = self.redact(call.function.arguments)
                total += count
                function = call.function.model_copy(update={"arguments": arguments})
                calls.append(call.model_copy(update={"function": function}))
            update["tool_calls"] = calls
        return (message.model_copy(update=update), total) if total else (message, 0)


def _prefixes(secret: str) -> str:
    """A pattern for ``secret`` or its longest prefix of at least :func:`fragment_size`
    characters: ``CANARY-3f9(?:a(?:1(?:...)?)?)?``."""
    size = fragment_size(secret)
    pattern = ""
    for char in reversed(secret[size:]):
        pattern = f"(?:{re.escape(char)}{pattern})?"
    return re.escape(secret[:size]) + pattern


def fragment_size(secret: str) -> int:
    """The shortest part of ``secret`` that is redacted on its own: half of it, at least
    :data:`FRAGMENT` characters (all of it when it is shorter)."""
    return min(len(secret), max(FRAGMENT, (len(secret) + 1) // 2))


def _replace(text: str, spans: Sequence[tuple[int, int]]) -> tuple[str, int]:
    if not spans:
        return text, 0
    out, last = [], 0
    for start, end in spans:
        out.append(text[last:start])
        out.append(REDACTED)
        last = end
    out.append(text[last:])
    return "".join(out), len(spans)


class StreamRedactor:
    """Redacts the secrets of one streamed answer, chunk by chunk, each choice on its own.

    Logprobs are removed from every chunk: they would carry the held-back text's tokens before
    it is checked."""

    def __init__(self, redactor: SecretRedactor) -> None:
        self._redactor = redactor
        self._held: dict[int, str] = {}
        # Tool-call arguments stream in pieces too: held per (choice, call).
        self._held_arguments: dict[tuple[int, int], str] = {}
        self._last: ChatCompletionChunk | None = None

    def follow(self, chunk: ChatCompletionChunk) -> tuple[ChatCompletionChunk, int]:
        """``chunk`` with what may be sent of its text; the rest is held for the next chunks."""
        if not chunk.choices:
            return chunk, 0
        self._last = chunk
        total = 0
        choices = []
        for choice in chunk.choices:
            pending = self._held.pop(choice.index, "") + (choice.delta.content or "")
            if choice.finish_reason is not None:
                sent, count = self._redactor.redact(pending)
            else:
                sent, held, count = self._redactor.release(pending)
                if held:
                    self._held[choice.index] = held
            content = sent if sent or choice.delta.content is not None else None
            calls, arguments_count = self._follow_calls(choice)
            total += count + arguments_count
            delta = choice.delta.model_copy(update={"content": content, "tool_calls": calls})
            choices.append(choice.model_copy(update={"delta": delta, "logprobs": None}))
        return chunk.model_copy(update={"choices": choices}), total

    def _follow_calls(self, choice: ChunkChoice) -> tuple[list[ToolCallDelta] | None, int]:
        """The choice's tool-call pieces with what may be sent of their arguments; on its last
        chunk, every call's held arguments are sent too."""
        total = 0
        calls = []
        for call in choice.delta.tool_calls or ():
            key = (choice.index, call.index)
            piece = call.function.arguments if call.function is not None else None
            pending = self._held_arguments.pop(key, "") + (piece or "")
            sent, held, count = self._redactor.release(pending)
            if held:
                self._held_arguments[key] = held
            total += count
            if call.function is not None:
                arguments = sent if sent or piece is not None else None
                call = call.model_copy(
                    update={"function": call.function.model_copy(update={"arguments": arguments})}
                )
            calls.append(call)
        if choice.finish_reason is not None:
            for key in sorted(k for k in self._held_arguments if k[0] == choice.index):
                sent, count = self._redactor.redact(self._held_arguments.pop(key))
                total += count
                calls.append(ToolCallDelta(index=key[1], function=FunctionCallDelta(arguments=sent)))
        return (calls or choice.delta.tool_calls), total

    def drain(self) -> tuple[ChatCompletionChunk | None, int]:
        """A last chunk with the text still held (a stream that ended without finishing a
        choice), or None."""
        if not (self._held or self._held_arguments) or self._last is None:
            return None, 0
        total = 0
        deltas: dict[int, Delta] = {}
        for index, pending in sorted(self._held.items()):
            sent, count = self._redactor.redact(pending)
            total += count
            deltas[index] = Delta(content=sent)
        for (index, call), pending in sorted(self._held_arguments.items()):
            sent, count = self._redactor.redact(pending)
            total += count
            delta = deltas.setdefault(index, Delta())
            piece = ToolCallDelta(index=call, function=FunctionCallDelta(arguments=sent))
            delta.tool_calls = [*(delta.tool_calls or ()), piece]
        choices = [ChunkChoice(index=index, delta=delta) for index, delta in sorted(deltas.items())]
        self._held.clear()
        self._held_arguments.clear()
        return self._last.model_copy(update={"choices": choices, "usage": None, "route": None}), total
