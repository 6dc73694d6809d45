"""Cross-entropy on the answer tokens, without computing logits for the rest of the sequence.

A causal LM's own loss projects every position onto the whole vocabulary (49,152 words for
SmolLM2) before masking all but the answer: for a 400-token PubMedQA prompt with a one-word
answer that is 99% wasted, and on CPU it is most of a training step. Here the decoder runs once,
and only the hidden states that predict a labelled token go through the output layer.
Models that transform their logits after the output layer (soft-capping, a logit scale) take
the model's own path, which is exact for every model.
"""

from __future__ import annotations

from typing import Any

from adapters.chat_tokens import IGNORE


def _logits_are_plain(causal_lm: Any) -> bool:
    config = causal_lm.config
    capped = getattr(config, "final_logit_softcapping", None)
    return not capped and getattr(config, "logit_scale", None) in {None, 1.0}


def answer_loss(model: Any, batch: dict[str, Any]) -> tuple[Any, int]:
    """(summed loss tensor, labelled tokens) for a collated batch; ``model`` a PEFT causal LM."""
    import torch

    labels = batch["labels"][:, 1:]
    selected = labels != IGNORE
    count = int(selected.sum())
    causal_lm = model.get_base_model()
    if not _logits_are_plain(causal_lm):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        hidden_logits = logits[:, :-1][selected]
    else:
        decoder, head = causal_lm.get_decoder(), causal_lm.get_output_embeddings()
        hidden = decoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        hidden_logits = head(hidden.last_hidden_state[:, :-1][selected])
    loss = torch.nn.functional.cross_entropy(hidden_logits.float(), labels[selected], reduction="sum")
    return loss, count
