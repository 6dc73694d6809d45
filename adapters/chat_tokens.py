"""Chat examples as token ids with labels on the assistant's tokens only.

The model's own chat template renders each conversation, exactly as the engine will render it at
serving time. The assistant's tokens are found by rendering the conversation up to each assistant
turn (with the generation prompt) and up to the end of that turn: the tokens in between are the
answer, end-of-turn marker included, so the model learns to stop. Everything else is labelled
-100 and carries no loss: the model is taught to answer, not to write prompts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adapters.training_data import Example, Message

IGNORE = -100


class TemplateError(ValueError):
    """The tokenizer's chat template cannot mark the assistant's tokens."""


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]

    @property
    def answer_tokens(self) -> int:
        return sum(label != IGNORE for label in self.labels)


def _as_dicts(messages: tuple[Message, ...]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in messages]


class ChatEncoder:
    """Encodes examples for training (``encode``) and prompts for generation (``prompt_ids``)."""

    def __init__(self, tokenizer: Any) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise TemplateError("the tokenizer has no chat template: train on an instruct/chat model")
        self.tokenizer = tokenizer

    def _render(self, messages: tuple[Message, ...], *, generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            _as_dicts(messages), tokenize=True, add_generation_prompt=generation_prompt
        )
        # transformers 5 returns a BatchEncoding here, 4.x a plain list.
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def encode(self, example: Example) -> Encoded:
        """The whole conversation, labels on every assistant turn."""
        full = self._render(example.messages, generation_prompt=False)
        labels = [IGNORE] * len(full)
        for index, message in enumerate(example.messages):
            if message.role != "assistant":
                continue
            prefix = self._render(example.messages[:index], generation_prompt=True)
            start = len(prefix)
            end = len(self._render(example.messages[: index + 1], generation_prompt=False))
            if full[:start] != prefix:
                raise TemplateError(
                    "the chat template renders a conversation's prefix differently from the "
                    "conversation itself, so the assistant's tokens cannot be told apart"
                )
            # Keep the end-of-turn token; the newline some templates add after it is not learnt.
            labels[start:end] = full[start:end]
            if end > start and self.tokenizer.decode(full[end - 1 : end]).isspace():
                labels[end - 1] = IGNORE
        return Encoded(full, labels)

    def length(self, example: Example) -> int:
        """Tokens in the rendered conversation (what curation compares with the maximum)."""
        return len(self._render(example.messages, generation_prompt=False))

    @property
    def pad_id(self) -> int:
        """The padding token, or end-of-sequence for tokenizers without one."""
        pad: int | None = self.tokenizer.pad_token_id
        return pad if pad is not None else int(self.tokenizer.eos_token_id)

    def prompt_ids(self, example: Example) -> list[int]:
        """The turns before the last answer, ending with the assistant's generation prompt."""
        return self._render(example.prompt, generation_prompt=True)
