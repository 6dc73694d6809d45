"""The adapter against its base model on held-out rows: loss, perplexity and a task metric.

Both sides get the same prompts and the same greedy decoding; the base is the very same model
with the adapter switched off (``disable_adapter``), so nothing differs but the LoRA weights.
The task metric follows the data: when the answers are a few short labels (yes/no/maybe, intent
names) it is label accuracy, the prediction being the label the generated answer starts with
(so "Yes, because..." counts as yes: the base is not penalised for talking); when the answers
are short texts it is exact match after normalising case, spacing and punctuation; otherwise
there is none and the losses speak alone.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from adapters.answer_loss import answer_loss
from adapters.batches import collate, evaluation_batches, to_device
from adapters.chat_tokens import ChatEncoder, Encoded
from adapters.device import Placement
from adapters.training_data import Example, normalise

MetricKind = Literal["label_accuracy", "exact_match"]
_MAX_LABELS = 20
_LABEL_WORDS = 5
_SHORT_ANSWER_WORDS = 12


def metric_kind(examples: Sequence[Example]) -> MetricKind | None:
    """Which task metric fits these answers, if any."""
    answers = [normalise(e.answer) for e in examples]
    distinct = set(answers)
    if (
        len(distinct) <= _MAX_LABELS
        and len(distinct) * 2 <= len(answers)
        and all(len(a.split()) <= _LABEL_WORDS for a in distinct)
    ):
        return "label_accuracy"
    if sum(len(a.split()) for a in answers) <= _SHORT_ANSWER_WORDS * len(answers):
        return "exact_match"
    return None


def predicted_label(generated: str, labels: Sequence[str]) -> str | None:
    """The (normalised) label that the generated text starts with; the longest when several do."""
    text = normalise(generated)
    matches = [label for label in labels if text == label or text.startswith(label + " ")]
    return max(matches, key=len) if matches else None


@dataclass(frozen=True)
class Scores:
    loss: float
    perplexity: float
    metric: float | None
    predictions: dict[str, int]
    """How often each label was predicted (``other``: none), for label accuracy: shows whether a
    model only ever gives one answer."""

    def to_json(self) -> dict[str, Any]:
        return {
            "loss": round(self.loss, 4),
            "perplexity": round(self.perplexity, 3),
            "metric": None if self.metric is None else round(self.metric, 4),
            "predictions": self.predictions,
        }


@dataclass(frozen=True)
class Comparison:
    rows: int
    metric: MetricKind | None
    base: Scores
    adapter: Scores
    majority_label: str | None
    majority_share: float | None
    """Accuracy of always answering the training set's most common label."""

    def to_json(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "metric": self.metric,
            "base": self.base.to_json(),
            "adapter": self.adapter.to_json(),
            "majority_label": self.majority_label,
            "majority_share": None if self.majority_share is None else round(self.majority_share, 4),
        }


def mean_loss(
    model: Any, rows: Sequence[Encoded], *, pad_id: int, batch_size: int, placement: Placement
) -> float:
    """Mean cross-entropy per assistant token (token-weighted across batches)."""
    import torch

    total, tokens = 0.0, 0
    model.eval()
    with torch.no_grad(), placement.autocast():
        for batch in evaluation_batches(rows, batch_size):
            summed, count = answer_loss(model, to_device(collate(batch, pad_id), placement.device))
            total += float(summed)
            tokens += count
    return total / max(tokens, 1)


def generate(
    model: Any,
    encoder: ChatEncoder,
    prompts: Sequence[list[int]],
    *,
    max_new_tokens: int,
    batch_size: int,
    placement: Placement,
) -> list[str]:
    """Greedy answers to ``prompts`` (token ids), left-padded in batches."""
    import torch

    pad_id = encoder.pad_id
    answers = [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    model.eval()
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, i in enumerate(chunk):
            ids[row, width - len(prompts[i]) :] = torch.tensor(prompts[i])
            mask[row, width - len(prompts[i]) :] = 1
        with torch.no_grad(), placement.autocast():
            out = model.generate(
                input_ids=ids.to(placement.device),
                attention_mask=mask.to(placement.device),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=pad_id,
            )
        for row, i in enumerate(chunk):
            answers[i] = encoder.tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return answers


class Evaluator:
    """Scores a model (adapter on or off) on the validation rows."""

    def __init__(
        self,
        encoder: ChatEncoder,
        train: Sequence[Example],
        validation: Sequence[Example],
        *,
        batch_size: int,
        placement: Placement,
    ) -> None:
        self.encoder = encoder
        self.validation = list(validation)
        self.encoded = [encoder.encode(e) for e in validation]
        self.batch_size = batch_size
        self.placement = placement
        self.metric = metric_kind([*train, *validation])
        self.gold = [normalise(e.answer) for e in validation]
        train_labels = Counter(normalise(e.answer) for e in train)
        self.labels = sorted(set(train_labels) | set(self.gold))
        # Both models are asked the same prompts: rendered once.
        self.prompts = [encoder.prompt_ids(e) for e in validation] if self.metric else []
        self.majority_label: str | None = None
        self.majority_share: float | None = None
        if self.metric == "label_accuracy":
            self.majority_label = train_labels.most_common(1)[0][0]
            self.majority_share = self.gold.count(self.majority_label) / len(self.gold)
        tokenizer = encoder.tokenizer
        longest = max(len(tokenizer(e.answer)["input_ids"]) for e in [*train, *validation])
        # Room for the longest answer and a little chatter before the base would reach it.
        self.max_new_tokens = longest + 8

    def loss(self, model: Any) -> float:
        return mean_loss(
            model,
            self.encoded,
            pad_id=self.encoder.pad_id,
            batch_size=self.batch_size,
            placement=self.placement,
        )

    def scores(self, model: Any, *, loss: float | None = None) -> Scores:
        """Loss (unless known), perplexity and the task metric of ``model`` as it is now."""
        loss = self.loss(model) if loss is None else loss
        metric: float | None = None
        predictions: dict[str, int] = {}
        if self.metric is not None:
            generated = generate(
                model,
                self.encoder,
                self.prompts,
                max_new_tokens=self.max_new_tokens,
                batch_size=self.batch_size,
                placement=self.placement,
            )
            correct, counts = self._score(generated)
            metric = correct / len(generated)
            predictions = dict(counts.most_common())
        return Scores(loss, math.exp(min(loss, 50.0)), metric, predictions)

    def _score(self, generated: Sequence[str]) -> tuple[int, Counter[str]]:
        if self.metric != "label_accuracy":
            return sum(normalise(text) == g for text, g in zip(generated, self.gold, strict=True)), Counter()
        predicted = [predicted_label(text, self.labels) for text in generated]
        correct = sum(p == g for p, g in zip(predicted, self.gold, strict=True))
        return correct, Counter("other" if p is None else p for p in predicted)

    def compare(self, model: Any, *, base_loss: float | None = None) -> Comparison:
        """The adapter's scores and the base's (the same model with the adapter disabled);
        ``base_loss`` when already measured (the trainer's step 0)."""
        with model.disable_adapter():
            base = self.scores(model, loss=base_loss)
        adapter = self.scores(model)
        return Comparison(
            len(self.validation), self.metric, base, adapter, self.majority_label, self.majority_share
        )
