"""The training loop: LoRA steps, validation every ``eval_steps``, early stopping, best weights kept.

Validation loss is measured before the first step too: PEFT starts ``lora_B`` at zero, so that
first figure is the base model's own loss on the held-out rows, the line the adapter must beat.
Training stops once ``patience`` validations in a row fail to improve on the best by
``min_delta`` (the adapter has started to learn the training rows rather than the task), and the
weights of the best validation are what is saved, not the last ones.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from adapters.answer_loss import answer_loss
from adapters.batches import collate, to_device, training_order
from adapters.chat_tokens import Encoded
from adapters.device import Placement
from adapters.evaluation import Evaluator
from adapters.train_config import TrainConfig


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


class Trainer:
    def __init__(
        self,
        model: Any,
        train: Sequence[Encoded],
        evaluator: Evaluator,
        config: TrainConfig,
        *,
        placement: Placement,
        progress: bool = True,
    ) -> None:
        self.model = model
        self.train = list(train)
        self.evaluator = evaluator
        self.config = config
        self.placement = placement
        self.progress = progress
        batches_per_epoch = math.ceil(len(self.train) / config.batch_size)
        steps_per_epoch = max(1, batches_per_epoch // config.gradient_accumulation)
        self.total_steps = max(1, round(steps_per_epoch * config.epochs))
        self.eval_steps = config.eval_steps or max(1, steps_per_epoch // 4)
        self.steps_per_epoch = steps_per_epoch

    def run(self) -> TrainResult:
        import torch
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        from tqdm import tqdm
        from transformers import get_linear_schedule_with_warmup

        config = self.config
        params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
        schedule = get_linear_schedule_with_warmup(  # type: ignore[no-untyped-call]
            optimizer, round(config.warmup_fraction * self.total_steps), self.total_steps
        )
        result = TrainResult(self.total_steps)
        started = time.monotonic()
        result.validations.append(Validation(0, 0.0, self.evaluator.loss(self.model), None))
        best_state = _clone(get_peft_model_state_dict(self.model))
        since_best, pending = 0, []
        rng = random.Random(config.seed)
        bar = tqdm(total=self.total_steps, desc="training", unit="step", disable=not self.progress)
        micro = 0
        while result.steps < self.total_steps and not result.stopped_early:
            for batch in training_order(self.train, config.batch_size, rng):
                self.model.train()
                tensors = to_device(collate(batch, self.evaluator.encoder.pad_id), self.placement.device)
                with self.placement.autocast():
                    summed, tokens = answer_loss(self.model, tensors)
                loss = summed / max(tokens, 1)
                (loss / config.gradient_accumulation).backward()
                pending.append(float(loss.detach()))
                micro += 1
                if micro % config.gradient_accumulation:
                    continue
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                result.steps += 1
                result.train_losses.append(
                    sum(pending[-config.gradient_accumulation :]) / config.gradient_accumulation
                )
                bar.update(1)
                bar.set_postfix(loss=f"{result.train_losses[-1]:.3f}")
                if result.steps % self.eval_steps == 0 or result.steps == self.total_steps:
                    validation = self._validate(result, pending)
                    pending = []
                    bar.write(
                        f"step {validation.step}: train loss {validation.train_loss:.4f}, "
                        f"validation loss {validation.loss:.4f}"
                    )
                    if validation.loss < result.best_loss - config.min_delta:
                        result.best_step, since_best = validation.step, 0
                        best_state = _clone(get_peft_model_state_dict(self.model))
                    else:
                        since_best += 1
                        result.stopped_early = since_best >= config.patience
                if result.steps >= self.total_steps or result.stopped_early:
                    break
        bar.close()
        set_peft_model_state_dict(self.model, best_state)
        result.seconds = time.monotonic() - started
        return result

    def _validate(self, result: TrainResult, pending: list[float]) -> Validation:
        train_loss = sum(pending) / len(pending) if pending else None
        validation = Validation(
            result.steps, result.steps / self.steps_per_epoch, self.evaluator.loss(self.model), train_loss
        )
        result.validations.append(validation)
        return validation


def _clone(state: dict[str, Any]) -> dict[str, Any]:
    return {k: v.detach().clone() for k, v in state.items()}
