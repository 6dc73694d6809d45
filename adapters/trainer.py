"""The training loop: ``transformers.Trainer`` with the assistant-only loss, validation every
``eval_steps``, early stopping, best weights kept, checkpoints to resume from.

Validation loss is measured before the first step too: PEFT starts ``lora_B`` at zero, so that
first figure is the base model's own loss on the held-out rows, the line the adapter must beat.
Training stops once ``patience`` validations in a row fail to improve on the best by
``min_delta`` (``EarlyStoppingCallback``: the adapter has started to learn the training rows
rather than the task), and the weights of the best validation are what is saved, not the last
ones (``load_best_model_at_end``). When no validation beats step 0, the adapter goes back to its
initial weights, which are the base model.

Three things differ from a stock ``Trainer``:
- the loss (``compute_loss``) is cross-entropy on the answer tokens only, summed and divided by
  the answer tokens of the whole accumulated batch (``num_items_in_batch``), so long and short
  answers weigh per token, however the rows fall into micro-batches;
- validation (``evaluate``) is the same token-weighted loss that the comparison with the base
  reports (``Evaluator.loss``), not the Trainer's mean of per-batch means, so the step-0 figure
  is exactly the base's;
- step 0 is a candidate best: the stock Trainer only ranks validations that save a checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.chat_tokens import Encoded
from adapters.device import Placement
from adapters.evaluation import Evaluator
from adapters.train_config import TrainConfig

_KEEP_CHECKPOINTS = 2
"""The best and the latest: enough to resume and to restore the best."""


@dataclass(frozen=True)
class Validation:
    step: int
    epoch: float
    loss: float
    train_loss: float | None
    """Mean training loss over the steps since the previous validation (None at step 0)."""


@dataclass
class TrainResult:
    total_steps: int
    steps: int = 0
    train_losses: list[float] = field(default_factory=list)
    """One per optimizer step."""
    validations: list[Validation] = field(default_factory=list)
    best_step: int = 0
    stopped_early: bool = False
    resumed_from: int | None = None
    """The step of the checkpoint this run resumed from, if it did."""
    seconds: float = 0.0

    @property
    def base_loss(self) -> float:
        return self.validations[0].loss

    @property
    def best_loss(self) -> float:
        return next(v.loss for v in self.validations if v.step == self.best_step)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "planned_steps": self.total_steps,
            "best_step": self.best_step,
            "best_validation_loss": round(self.best_loss, 4),
            "stopped_early": self.stopped_early,
            "resumed_from_step": self.resumed_from,
            "seconds": round(self.seconds, 1),
            "validations": [
                {
                    "step": v.step,
                    "epoch": round(v.epoch, 3),
                    "validation_loss": round(v.loss, 4),
                    "train_loss": None if v.train_loss is None else round(v.train_loss, 4),
                }
                for v in self.validations
            ],
        }


def latest_checkpoint(directory: Path) -> Path | None:
    """The newest ``checkpoint-N`` under ``directory``, if any."""
    found = [p for p in directory.glob("checkpoint-*") if p.name.removeprefix("checkpoint-").isdigit()]
    return max(found, key=lambda p: int(p.name.removeprefix("checkpoint-")), default=None)


class Trainer:
    """One run: ``run()`` trains ``model`` (a PEFT model) in place and leaves the best weights."""

    def __init__(
        self,
        model: Any,
        train: Sequence[Encoded],
        evaluator: Evaluator,
        config: TrainConfig,
        *,
        placement: Placement,
        checkpoints: Path,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.train = list(train)
        self.evaluator = evaluator
        self.config = config
        self.placement = placement
        self.checkpoints = checkpoints
        self.progress = progress
        batches_per_epoch = -(-len(self.train) // config.batch_size)
        steps_per_epoch = max(1, batches_per_epoch // config.gradient_accumulation)
        self.total_steps = max(1, round(steps_per_epoch * config.epochs))
        self.eval_steps = config.eval_steps or max(1, steps_per_epoch // 4)
        self.steps_per_epoch = steps_per_epoch

    def run(self, *, resume: bool = False) -> TrainResult:
        """Train; with ``resume``, from the latest checkpoint under ``checkpoints`` (the caller
        has checked that it belongs to this run)."""
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from transformers import EarlyStoppingCallback, PrinterCallback

        from adapters.hf_trainer import AnswerTrainer, Collator, EvaluateAtTheEnd

        start = latest_checkpoint(self.checkpoints) if resume else None
        if resume and start is None:
            raise ValueError(f"--resume: no checkpoint under {self.checkpoints}")
        initial = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        trainer = AnswerTrainer(
            evaluator=self.evaluator,
            model=self.model,
            args=self._arguments(eval_on_start=start is None),
            train_dataset=_rows(self.train),
            # Validated by ``AnswerTrainer.evaluate`` through the evaluator, on these same rows.
            eval_dataset=_rows(self.evaluator.encoded),
            data_collator=Collator(self.evaluator.encoder.pad_id),
            callbacks=[
                EvaluateAtTheEnd(),
                EarlyStoppingCallback(self.config.patience, self.config.min_delta),
            ],
        )
        if not self.progress:
            trainer.remove_callback(PrinterCallback)  # it prints every log line to stdout
        started = time.monotonic()
        trainer.train(resume_from_checkpoint=str(start) if start else None)
        state = trainer.state
        best_step = state.best_global_step or 0
        if best_step == 0:
            # Nothing beat step 0, whose weights no checkpoint holds: they are the initial ones.
            set_peft_model_state_dict(self.model, initial)
        result = self._result(state.log_history, state.global_step, best_step)
        result.resumed_from = int(start.name.removeprefix("checkpoint-")) if start else None
        result.seconds = time.monotonic() - started
        return result

    def _arguments(self, *, eval_on_start: bool) -> Any:
        from transformers import TrainingArguments

        config = self.config
        return TrainingArguments(
            output_dir=str(self.checkpoints),
            max_steps=self.total_steps,
            per_device_train_batch_size=config.batch_size,
            per_device_eval_batch_size=config.batch_size,
            gradient_accumulation_steps=config.gradient_accumulation,
            learning_rate=config.learning_rate,
            weight_decay=config.weight_decay,
            max_grad_norm=config.max_grad_norm,
            lr_scheduler_type="linear",
            warmup_steps=round(config.warmup_fraction * self.total_steps),
            optim="adamw_torch",
            seed=config.seed,
            data_seed=config.seed,
            bf16=self.placement.bf16,
            use_cpu=self.placement.device == "cpu",
            # Length-grouped batches: on CPU the padding of a random batch is most of a step.
            train_sampling_strategy="group_by_length",
            remove_unused_columns=False,
            dataloader_num_workers=0,
            eval_strategy="steps",
            eval_steps=self.eval_steps,
            eval_on_start=eval_on_start,
            save_strategy="steps",
            save_steps=self.eval_steps,
            save_total_limit=_KEEP_CHECKPOINTS,
            load_best_model_at_end=True,
            metric_for_best_model="eval_loss",
            greater_is_better=False,
            # The early-stopping counter resumes with the run rather than starting again at 0.
            restore_callback_states_from_checkpoint=True,
            logging_strategy="steps",
            logging_steps=1,
            report_to="none",
            disable_tqdm=not self.progress,
        )

    def _result(self, history: list[dict[str, Any]], steps: int, best_step: int) -> TrainResult:
        losses = {int(e["step"]): float(e["loss"]) for e in history if "loss" in e}
        evaluations = {int(e["step"]): float(e["eval_loss"]) for e in history if "eval_loss" in e}
        result = TrainResult(self.total_steps, steps=steps, best_step=best_step)
        result.train_losses = [losses[s] for s in sorted(losses)]
        result.stopped_early = steps < self.total_steps
        previous: int | None = None
        for step in sorted(evaluations):
            since = [loss for s, loss in losses.items() if (previous or 0) < s <= step]
            result.validations.append(
                Validation(
                    step,
                    step / self.steps_per_epoch,
                    evaluations[step],
                    sum(since) / len(since) if since and previous is not None else None,
                )
            )
            previous = step
        return result


def _rows(encoded: Sequence[Encoded]) -> list[dict[str, list[int]]]:
    """Dicts, so that the length-grouped sampler can read each row's length."""
    return [{"input_ids": e.input_ids, "labels": e.labels} for e in encoded]
