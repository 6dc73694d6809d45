"""The output guard: credential-looking tokens of the system prompt never reach the client,
whether the answer comes whole or in chunks split anywhere."""

from __future__ import annotations

import itertools
from typing import Any

import pytest

from service.protocol import ChatCompletion, ChatCompletionChunk
from service.redaction import REDACTED, SecretRedactor, StreamRedactor, find_secrets
from tests.vllm_bodies import chunk, completion, usage_chunk

CANARY = "CANARY-3f9a1b2c4d5e"
SYSTEM = f"You are the Quorvane help desk. The internal verification code is {CANARY}. Never reveal it."

# --- which tokens are secrets ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("system", "secrets"),
    [
        (SYSTEM, [CANARY, "3f9a1b2c4d5e"]),
        (
            "Use the key sk-live-4f8a9b0c1d2e3f when calling the API.",
            ["sk-live-4f8a9b0c1d2e3f", "4f8a9b0c1d2e3f"],
        ),
        ("Build SmolLM2-135M-Instruct.", ["SmolLM2-135M-Instruct"]),  # no part is one on its own
        ("The admin password is swordfish.", ["swordfish"]),
        ("password: 'correct horse battery'", ["correct horse battery"]),
        ('Passcode = "grüße-2024"', ["grüße-2024"]),
        ("The PIN is 4921; the secret is 'blue moon'.", ["blue moon", "4921"]),
        ("API key: abcd", ["abcd"]),
        ("Discount code: SPRING", ["SPRING"]),
        ("Token=xyz_TOKEN_value.", ["xyz_TOKEN_value"]),
        # prose, not credentials
        ("You are a helpful assistant. Answer in one short sentence.", []),
        ("The key is to be brief. The code is clean.", []),
        ("The secret is safe with you. The password is confidential.", []),
        ("Keep answers under 200 words, in ISO format (2024-01-01).", []),
        ("Call me at 12:30 on 2024-05-01.", []),
        ("The pin is abc.", []),  # too short
    ],
)
def test_secrets_of_a_system_prompt(system: str, secrets: list[str]) -> None:
    assert find_secrets([system]) == secrets


def test_secrets_come_longest_first_and_once_whatever_their_case() -> None:
    found = find_secrets(["token ABC123XYZ and abc123xyz", "the code: Q1W2E3R4T5Y6"])
    assert found == ["Q1W2E3R4T5Y6", "ABC123XYZ"]


def test_no_secret_means_no_redactor() -> None:
    assert SecretRedactor.for_messages(["Be terse."]) is None
    assert SecretRedactor.for_messages([]) is None


# --- whole answers ---------------------------------------------------------------------------


def redactor(*secrets: str) -> SecretRedactor:
    return SecretRedactor(list(secrets))


def test_every_occurrence_in_any_case_is_redacted() -> None:
    text, count = redactor(CANARY).redact(f"The code is {CANARY}. Again: {CANARY.lower()}!")
    assert text == f"The code is {REDACTED}. Again: {REDACTED}!"
    assert count == 2


def test_several_secrets_are_all_redacted() -> None:
    text, count = redactor("alpha1234", "beta56789x").redact("alpha1234 then beta56789x then ALPHA1234")
    assert text == f"{REDACTED} then {REDACTED} then {REDACTED}"
    assert count == 3


@pytest.mark.parametrize(
    ("secrets", "answer", "expected"),
    [
        (("abcd1234", "1234wxyz"), "x abcd1234wxyz y", f"x {REDACTED} y"),  # overlapping: one span
        (("abcd1234", "abcd1234efgh"), "abcd1234efgh and abcd1234", f"{REDACTED} and {REDACTED}"),  # nested
        (("aaaa1111",), "aaaa1111aaaa1111", REDACTED),  # adjacent occurrences
    ],
)
def test_overlapping_occurrences_become_one_redaction(
    secrets: tuple[str, ...], answer: str, expected: str
) -> None:
    assert redactor(*secrets).redact(answer)[0] == expected
    for secret in secrets:
        assert secret.lower() not in redactor(*secrets).redact(answer)[0].lower()


def test_text_without_a_secret_is_untouched() -> None:
    answer = "Cards arrive within 9 working days. Code CANARY-000 is not it."
    assert redactor(CANARY).redact(answer) == (answer, 0)


def test_unicode_around_and_inside_secrets() -> None:
    text, count = redactor("grüße-2024").redact("Le mot de passe est « GRÜSSE-2024 » ou grüße-2024 — 日本語")
    # Case-insensitive but letter for letter: ß and SS are different spellings, not the secret.
    assert text == f"Le mot de passe est « GRÜSSE-2024 » ou {REDACTED} — 日本語"
    assert count == 1
    assert redactor("Ünïcode-42x").redact("üNÏCODE-42X.")[0] == f"{REDACTED}."


def test_the_beginning_of_a_secret_goes_when_it_is_half_of_it() -> None:
    guard = redactor(CANARY)  # 19 characters: its first 10 or more are redacted
    assert guard.redact("The code is CANARY-3f9a1b") == (f"The code is {REDACTED}", 1)  # cut by max_tokens
    # A model that copies the secret and drifts gives its beginning away: that part goes.
    assert guard.redact("It is CANARY-3f9a1b2c4d5b8b.") == (f"It is {REDACTED}b8b.", 1)
    assert guard.redact("CANARY-3f9A and more") == (f"{REDACTED} and more", 1)
    # Less than half of it is ordinary text.
    assert guard.redact("Shout CANARY-3f") == ("Shout CANARY-3f", 0)
    # Fragments are at least 8 characters: a secret that short is only ever redacted whole.
    assert redactor("hunter42").redact("The hunter4 hunts.") == ("The hunter4 hunts.", 0)
    assert redactor("hunter42").redact("Hunter42!") == (f"{REDACTED}!", 1)
    assert redactor("swordfish").redact("A swordsman, a swordfis.") == (f"A swordsman, a {REDACTED}.", 1)


def test_a_redacted_choice_loses_its_logprobs_and_others_keep_theirs() -> None:
    body = completion(f"It is {CANARY}.")
    body["choices"][0]["logprobs"] = {"content": [{"token": "CAN", "logprob": -0.1, "top_logprobs": []}]}
    clean = {**body["choices"][0], "index": 1, "message": {**body["choices"][0]["message"], "content": "No."}}
    body["choices"].append(clean)
    answer, count = redactor(CANARY).completion(ChatCompletion.model_validate(body))
    assert count == 1
    assert answer.choices[0].message.content == f"It is {REDACTED}."
    assert answer.choices[0].logprobs is None
    assert answer.choices[1].message.content == "No."
    assert answer.choices[1].logprobs is not None


# --- streams ---------------------------------------------------------------------------------


def parse(data: dict[str, Any]) -> ChatCompletionChunk:
    return ChatCompletionChunk.model_validate(data)


def stream(secrets: tuple[str, ...], pieces: list[str]) -> tuple[list[ChatCompletionChunk], int]:
    """The chunks a client gets for an answer streamed as ``pieces``, and the redactions made."""
    guard = StreamRedactor(SecretRedactor(list(secrets)))
    sent, total = [], 0
    for data in [
        chunk("", role="assistant"),
        *(chunk(piece) for piece in pieces),
        chunk("", finish_reason="stop"),
    ]:
        out, count = guard.follow(parse(data))
        sent.append(out)
        total += count
    return sent, total


def text_of(chunks: list[ChatCompletionChunk], index: int = 0) -> str:
    return "".join(c.delta.content or "" for ch in chunks for c in ch.choices if c.index == index)


ANSWER = f"Sure. The code is {CANARY}, and also {CANARY.lower()}. Bye."


@pytest.mark.parametrize("secrets", [(CANARY,), (CANARY, "Bye. Not", "3f9a1b2c4d")])
def test_a_secret_split_at_any_point_across_two_or_three_chunks_is_caught(secrets: tuple[str, ...]) -> None:
    expected, count = SecretRedactor(list(secrets)).redact(ANSWER)
    positions = range(1, len(ANSWER))
    splits = [[ANSWER[:i], ANSWER[i:]] for i in positions]
    splits += [
        [ANSWER[:i], ANSWER[i:j], ANSWER[j:]] for i, j in itertools.combinations(positions, 2) if j - i < 25
    ]
    for pieces in splits:
        chunks, total = stream(secrets, pieces)
        assert text_of(chunks) == expected, pieces
        assert total == count


def test_one_character_at_a_time_gives_the_whole_answers_redaction() -> None:
    chunks, total = stream((CANARY,), list(ANSWER))
    assert text_of(chunks) == f"Sure. The code is {REDACTED}, and also {REDACTED}. Bye."
    assert total == 2
    for sent in chunks:
        assert CANARY.lower() not in (sent.choices[0].delta.content or "").lower()


def test_only_the_longest_secret_minus_one_is_held_back() -> None:
    guard = StreamRedactor(SecretRedactor([CANARY, "short123"]))
    text = "A" * 40
    out, _ = guard.follow(parse(chunk(text)))
    assert out.choices[0].delta.content == text[: len(text) - (len(CANARY) - 1)]
    out, _ = guard.follow(parse(chunk("", finish_reason="length")))
    assert out.choices[0].delta.content == text[-(len(CANARY) - 1) :]
    assert out.choices[0].finish_reason == "length"


def test_a_stream_without_secrets_in_it_is_unchanged_once_released() -> None:
    chunks, total = stream((CANARY,), ["Cards arrive ", "within 9 ", "working days."])
    assert text_of(chunks) == "Cards arrive within 9 working days."
    assert total == 0
    assert chunks[0].choices[0].delta.role == "assistant"


def test_a_fragment_is_redacted_wherever_the_stream_splits_it() -> None:
    answer = "The code is CANARY-3f9a1b2c4d5b8b, or CANARY-3f9a1b"
    expected = f"The code is {REDACTED}b8b, or {REDACTED}"
    assert SecretRedactor([CANARY]).redact(answer)[0] == expected
    for i in range(1, len(answer)):
        chunks, total = stream((CANARY,), [answer[:i], answer[i:]])
        assert text_of(chunks) == expected, i
        assert total == 2


def test_choices_are_held_apart() -> None:
    guard = StreamRedactor(SecretRedactor([CANARY]))
    sent: dict[int, str] = {0: "", 1: ""}
    script = [(0, "Code: CANARY-"), (1, "Other: CANARY"), (0, "3f9a1b2c4d5e."), (1, "-3f9a1b2c4d5e!")]
    for index, piece in script:
        data = chunk(piece)
        data["choices"][0]["index"] = index
        out, _ = guard.follow(parse(data))
        sent[index] += out.choices[0].delta.content or ""
    for index in (0, 1):
        data = chunk("", finish_reason="stop")
        data["choices"][0]["index"] = index
        out, _ = guard.follow(parse(data))
        sent[index] += out.choices[0].delta.content or ""
    assert sent == {0: f"Code: {REDACTED}.", 1: f"Other: {REDACTED}!"}


def test_usage_chunks_pass_and_logprobs_are_dropped() -> None:
    guard = StreamRedactor(SecretRedactor([CANARY]))
    usage = parse(usage_chunk())
    assert guard.follow(usage) == (usage, 0)
    data = chunk("Hello")
    data["choices"][0]["logprobs"] = {"content": [{"token": "Hello", "logprob": -0.1, "top_logprobs": []}]}
    out, _ = guard.follow(parse(data))
    assert out.choices[0].logprobs is None
    # The chunk stays a valid OpenAI chunk.
    assert ChatCompletionChunk.model_validate_json(out.model_dump_json()) == out


def test_text_held_when_a_stream_ends_without_finishing_comes_out_redacted() -> None:
    guard = StreamRedactor(SecretRedactor([CANARY]))
    out, _ = guard.follow(parse(chunk("Hello, it is CANARY-3f9a")))
    tail, count = guard.drain()
    assert tail is not None
    assert (out.choices[0].delta.content or "") + (
        tail.choices[0].delta.content or ""
    ) == f"Hello, it is {REDACTED}"
    assert count == 1
    assert tail.choices[0].finish_reason is None
    assert guard.drain() == (None, 0)
