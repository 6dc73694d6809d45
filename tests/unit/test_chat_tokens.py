"""Loss only on the assistant's tokens, as the served chat template renders them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from adapters.chat_tokens import IGNORE, ChatEncoder, TemplateError
from adapters.training_data import Example, Message


@pytest.fixture(scope="module")
def tokenizer(bundled_base_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(bundled_base_dir)


def example(*turns: tuple[str, str]) -> Example:
    return Example(tuple(Message(role, content) for role, content in turns), line=1)  # type: ignore[arg-type]


def labelled_text(tokenizer: Any, ids: list[int], labels: list[int]) -> list[str]:
    """The labelled spans, decoded."""
    spans: list[list[int]] = []
    for token, label in zip(ids, labels, strict=True):
        if label == IGNORE:
            if spans and spans[-1]:
                spans.append([])
            continue
        if not spans:
            spans.append([])
        spans[-1].append(token)
    return [tokenizer.decode(span) for span in spans if span]


def test_only_the_answer_and_its_end_of_turn_carry_loss(tokenizer: Any) -> None:
    encoded = ChatEncoder(tokenizer).encode(
        example(("system", "Answer in one word."), ("user", "Is the sky blue?"), ("assistant", "yes"))
    )
    assert labelled_text(tokenizer, encoded.input_ids, encoded.labels) == ["yes<|im_end|>"]
    assert encoded.answer_tokens == len(tokenizer("yes<|im_end|>")["input_ids"])
    assert len(encoded.labels) == len(encoded.input_ids)


def test_every_assistant_turn_of_a_conversation_is_learnt(tokenizer: Any) -> None:
    encoded = ChatEncoder(tokenizer).encode(
        example(("user", "Hi"), ("assistant", "Hello there."), ("user", "Bye"), ("assistant", "Goodbye."))
    )
    assert labelled_text(tokenizer, encoded.input_ids, encoded.labels) == [
        "Hello there.<|im_end|>",
        "Goodbye.<|im_end|>",
    ]


def test_the_prompt_is_what_the_engine_would_render(tokenizer: Any) -> None:
    conversation = example(("user", "Is the sky blue?"), ("assistant", "yes"))
    encoder = ChatEncoder(tokenizer)
    prompt = encoder.prompt_ids(conversation)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Is the sky blue?"}], add_generation_prompt=True, tokenize=False
    )
    assert tokenizer.decode(prompt) == rendered
    assert encoder.encode(conversation).input_ids[: len(prompt)] == prompt
    assert encoder.length(conversation) == len(encoder.encode(conversation).input_ids)


def test_a_tokenizer_without_a_chat_template_is_refused(tokenizer: Any) -> None:
    class Plain:
        chat_template = None

    with pytest.raises(TemplateError, match="no chat template"):
        ChatEncoder(Plain())
