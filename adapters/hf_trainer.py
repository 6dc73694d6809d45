"""The pieces ``adapters.trainer`` plugs into ``transformers.Trainer``: the assistant-only loss,
the validation the comparison with the base uses, and a validation at the last step.

Imported only when training runs: it needs the ``[train]`` extra (torch, transformers).
"""

from __future__ import annotations

import logging
from typing import Any

from transformers import Trainer, TrainerCallback

from adapters.answer_loss import answer_loss
from adapters.batches import collate
from adapters.chat_tokens import Encoded
from adapters.evaluation import Evaluator

logger = logging.getLogger(__name__)


class Collator:
    """The dataset's rows (dicts, so that the length-grouped sampler can read their lengths) as
    right-padded tensors."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: list[dict[str, list[int]]]) -> dict[str, Any]:
        return collate([Encoded(r["input_ids"], r["labels"]) for r in rows], self.pad_id)


class EvaluateAtTheEnd(TrainerCallback):
    """The last step is validated (and saved) even when it falls between two ``eval_steps``:
    the run's final weights are a candidate for the best."""

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        if state.global_step >= state.max_steps:
            control.should_evaluate = True
            control.should_save = True
        return control


class AnswerTrainer(Trainer):
    def __init__(self, *, evaluator: Evaluator, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.evaluator = evaluator

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        # answer_loss calls the decoder and the output layer, not the model's forward, which is
        # where accelerate puts its autocast: bf16 is asked for here, as in validation.
        with self.evaluator.placement.autocast():
            summed, tokens = answer_loss(model, inputs)
        # The Trainer counts the answer tokens of the whole accumulated batch when the model
        # takes loss arguments (Llama-style models do) and then does not divide by the
        # accumulation steps itself: dividing by that count makes the step's loss a per-token
        # mean over all its micro-batches.
        return summed / (num_items_in_batch if num_items_in_batch is not None else max(tokens, 1))

    def evaluate(
        self, eval_dataset: Any = None, ignore_keys: Any = None, metric_key_prefix: str = "eval"
    ) -> dict[str, float]:
        loss = self.evaluator.loss(self.model)
        metrics = {f"{metric_key_prefix}_loss": loss}
        self.log(metrics)
        step = self.state.global_step
        logger.info("step %d: validation loss %.4f", step, loss)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        if step == 0 and self.state.best_metric is None:
            # After the callbacks, so that early stopping does not count step 0 against itself.
            self.state.best_metric = loss
        return metrics
