"""One fine-tuning run end to end: curate and split the data, train a LoRA adapter with early
stopping, compare it with the base model on the held-out rows, and publish a PEFT directory
(safetensors only, model card, loss curve, report) that the adapter store accepts.

The directory is built under a scratch name beside its destination and renamed into place once
the store's own validation passes, so ``--output`` never holds a half-written adapter.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adapters.chat_tokens import ChatEncoder
from adapters.device import place
from adapters.durable import SCRATCH_PREFIX, fsync_dir
from adapters.evaluation import Comparison, Evaluator
from adapters.forgetting import (
    Forgetting,
    ForgettingMargin,
    GeneralSet,
    forgetting_verdict,
    measure_forgetting,
)
from adapters.model_card import CARD_FILE, write_card
from adapters.model_files import check_model_dir
from adapters.train_config import TrainConfig
from adapters.trainer import Trainer, TrainResult
from adapters.training_data import DataSplit, Example, load_split
from adapters.validation import BaseModelInfo, validate_adapter, validate_name

logger = logging.getLogger(__name__)

PROMPT_CHARS = 2000
"""The longest prompt the admin API takes (an example or a training prompt)."""
TRAINING_PROMPTS_LIMIT = 5000
"""The most training prompts the admin API takes for one adapter."""
RUN_FILE = "run.json"
"""In the checkpoint directory: the fingerprint a resumed run must match."""


@dataclass(frozen=True)
class TrainRequest:
    train_file: Path
    name: str
    output: Path
    """The adapter lands in ``output / name``."""
    base_model: Path
    """A Hugging Face causal LM directory (safetensors weights, a chat template)."""
    base_model_id: str | None = None
    """What the adapter's config names as its base (the served or Hugging Face id); None: the
    directory's absolute path."""
    config: TrainConfig = field(default_factory=TrainConfig)
    validation_file: Path | None = None
    force: bool = False
    """Train on fewer rows than training_data.MIN_ROWS."""
    overwrite: bool = False
    resume: bool = False
    """Go on from the latest checkpoint of an interrupted run of this name (same data and
    settings)."""
    max_rank: int = 64
    progress: bool = True
    forgetting_margin: ForgettingMargin = field(default_factory=ForgettingMargin)
    """How much worse than the base the adapter may be on the general set (adapters/forgetting.py)."""
    general: GeneralSet | None = None
    """The general set forgetting is measured on; None: the shipped one (tests pass a cut of it)."""


@dataclass(frozen=True)
class FineTuneResult:
    directory: Path
    split: DataSplit
    training: TrainResult
    comparison: Comparison
    report: dict[str, Any]
    forgetting: Forgetting

    @property
    def forgets(self) -> bool:
        """General quality (the shipped general set) falls beyond the request's margin."""
        return self.forgetting.forgets

    @property
    def beats_base(self) -> bool:
        """Lower validation loss, and no worse on the task metric when there is one."""
        base, adapter = self.comparison.base, self.comparison.adapter
        if adapter.loss >= base.loss:
            return False
        return base.metric is None or adapter.metric is None or adapter.metric >= base.metric


def fine_tune(request: TrainRequest) -> FineTuneResult:
    """Train, evaluate and publish. Bad input raises ``TrainingDataError``,
    ``AdapterValidationError`` (a bad name) or ``ValueError`` (``UnsafeModelError`` among them:
    a base model directory holding code or pickles)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = request.config
    validate_name(request.name, reserved=set())
    if config.rank > request.max_rank:
        raise ValueError(f"rank {config.rank} is above the gateway's largest ({request.max_rank})")
    destination = request.output / request.name
    if destination.exists() and not request.overwrite:
        raise ValueError(f"{destination} already exists (--overwrite replaces it)")
    check_model_dir(request.base_model, what="base model")
    base_info = BaseModelInfo.from_model_dir(request.base_model, request.base_model_id or "", None)
    unknown = set(config.target_modules) - (base_info.module_names or set(config.target_modules))
    if unknown:
        raise ValueError(f"target modules {sorted(unknown)} are not in {request.base_model}")
    placement = place(config.device, config.precision)

    # Remote code stays off and weights are safetensors only: a model directory is data, never
    # something to execute (check_model_dir above refused code and pickles already).
    tokenizer = AutoTokenizer.from_pretrained(request.base_model, trust_remote_code=False)
    encoder = ChatEncoder(tokenizer)
    split = load_split(
        request.train_file,
        validation_path=request.validation_file,
        validation_fraction=config.validation_fraction,
        seed=config.seed,
        length=encoder.length,
        max_length=config.max_length,
        force=request.force,
    )
    logger.info("data: %d training, %d validation rows", len(split.train), len(split.validation))

    random.seed(config.seed)
    torch.manual_seed(config.seed)  # lora_A's initialisation and dropout
    base_model: Any = AutoModelForCausalLM.from_pretrained(
        request.base_model, dtype=torch.float32, trust_remote_code=False, use_safetensors=True
    )
    base_model.to(placement.device)
    lora = LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,  # type: ignore[arg-type]  # a float scale is fine at run time
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base_model, lora)
    evaluator = Evaluator(
        encoder, split.train, split.validation, batch_size=config.batch_size, placement=placement
    )
    checkpoints = checkpoint_dir(request)
    fingerprint = _run_fingerprint(request, split)
    if request.resume:
        _check_resumable(checkpoints, fingerprint)
    else:
        shutil.rmtree(checkpoints, ignore_errors=True)  # a stale run's checkpoints: starting afresh
        checkpoints.mkdir(parents=True)
        (checkpoints / RUN_FILE).write_text(json.dumps(fingerprint, indent=2, sort_keys=True) + "\n")
    trainer = Trainer(
        model,
        [encoder.encode(e) for e in split.train],
        evaluator,
        config,
        placement=placement,
        checkpoints=checkpoints,
        progress=request.progress,
    )
    training = trainer.run(resume=request.resume)
    comparison = evaluator.compare(model, base_loss=training.base_loss)
    forgetting = measure_forgetting(
        model,
        encoder,
        placement=placement,
        margin=request.forgetting_margin,
        batch_size=config.batch_size,
        general=request.general,
    )
    logger.info("forgetting: %s", forgetting.to_json()["change"])
    run_facts = {
        "device": placement.device,
        "precision": placement.precision,
        "torch": torch.__version__,
        "eval_steps": trainer.eval_steps,
    }
    report = _report(request, split, training, comparison, forgetting, {**config.to_json(), **run_facts})
    directory = _publish(request, model, report, training, base_info)
    shutil.rmtree(checkpoints, ignore_errors=True)  # published: nothing left to resume
    return FineTuneResult(directory, split, training, comparison, report, forgetting)


def _report(
    request: TrainRequest,
    split: DataSplit,
    training: TrainResult,
    comparison: Comparison,
    forgetting: Forgetting,
    hyperparameters: dict[str, Any],
) -> dict[str, Any]:
    base, adapter = comparison.base, comparison.adapter
    better_loss = adapter.loss < base.loss
    verdict = (
        "The adapter's validation loss is lower than the base model's."
        if better_loss
        else "The adapter does not lower the base model's validation loss: it has learnt nothing "
        "that generalises; do not serve it."
    )
    if comparison.metric is not None and base.metric is not None and adapter.metric is not None:
        delta = 100 * (adapter.metric - base.metric)
        verdict += f" On {comparison.metric.replace('_', ' ')} it is {delta:+.1f} points against the base"
        if comparison.majority_share is not None:
            verdict += (
                f" and {100 * (adapter.metric - comparison.majority_share):+.1f} against the majority label"
            )
        verdict += "."
    verdict += " " + forgetting_verdict(forgetting)
    return {
        "name": request.name,
        "base_model": request.base_model_id or str(request.base_model.resolve()),
        "data": {
            "train_file": str(request.train_file),
            "validation_source": _validation_source(request),
            "train_curation": split.train_report.summary(),
            "train_curation_counts": split.train_report.to_json(),
            "validation_curation_counts": split.validation_report.to_json()
            if split.validation_report
            else None,
            "leaked": split.leaked,
            "train_rows": len(split.train),
            "validation_rows": len(split.validation),
        },
        "hyperparameters": hyperparameters,
        "training": training.to_json(),
        "evaluation": comparison.to_json(),
        "forgetting": forgetting.to_json(),
        "verdict": verdict,
    }


def checkpoint_dir(request: TrainRequest) -> Path:
    """Where a run keeps its checkpoints: hidden beside the adapter's destination, removed once
    the adapter is published, left for ``--resume`` when the run is interrupted."""
    return request.output / f".{request.name}.checkpoints"


def _run_fingerprint(request: TrainRequest, split: DataSplit) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: the same rows, the same base and
    the same settings (device and precision may change)."""
    settings = {k: v for k, v in request.config.to_json().items() if k not in {"device", "precision"}}
    rows = json.dumps([[e.to_json() for e in split.train], [e.to_json() for e in split.validation]])
    return {
        "base_model": str(request.base_model.resolve()),
        "settings": settings,
        "rows_sha256": hashlib.sha256(rows.encode()).hexdigest(),
    }


def _check_resumable(checkpoints: Path, fingerprint: dict[str, Any]) -> None:
    try:
        recorded = json.loads((checkpoints / RUN_FILE).read_text())
    except (OSError, ValueError):
        raise ValueError(f"--resume: no interrupted run under {checkpoints}") from None
    differs = sorted(k for k in fingerprint if recorded.get(k) != fingerprint[k])
    if differs:
        raise ValueError(
            f"--resume: the checkpoints under {checkpoints} are of a run with other {', '.join(differs)}"
        )


def _validation_source(request: TrainRequest) -> str:
    if request.validation_file is not None:
        return str(request.validation_file)
    return f"{request.config.validation_fraction:.0%} of the training file (seed {request.config.seed})"


def _publish(
    request: TrainRequest, model: Any, report: dict[str, Any], training: TrainResult, base: BaseModelInfo
) -> Path:
    request.output.mkdir(parents=True, exist_ok=True)
    scratch = request.output / f"{SCRATCH_PREFIX}{request.name}-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(str(scratch), safe_serialization=True)
        (scratch / CARD_FILE).unlink(missing_ok=True)  # PEFT's placeholder card; ours replaces it
        config_path = scratch / "adapter_config.json"
        saved = json.loads(config_path.read_text())
        saved["base_model_name_or_path"] = report["base_model"]
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
        write_card(scratch, report, training)
        # The store's own checks, against the model it was trained on: what --register will meet.
        served = BaseModelInfo(
            report["base_model"], frozenset({report["base_model"]}), base.module_names, base.weight_shapes
        )
        validate_adapter(
            config_path.read_bytes(),
            scratch / "adapter_model.safetensors",
            base=served,
            max_rank=request.max_rank,
        )
        destination = request.output / request.name
        if destination.exists():
            shutil.rmtree(destination)
        scratch.rename(destination)
        fsync_dir(request.output)
        return destination
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise


def routing_examples(examples: list[Example] | tuple[Example, ...], count: int, seed: int) -> list[str]:
    """Up to ``count`` distinct last user messages of the training rows (seeded sample), for the
    router when none are given; each cut to the admin API's 2,000 characters."""
    prompts = list(dict.fromkeys(_last_user_message(e) for e in examples))
    random.Random(seed).shuffle(prompts)
    return [p[:PROMPT_CHARS] for p in prompts[:count]]


def training_prompts(
    examples: list[Example] | tuple[Example, ...], limit: int = TRAINING_PROMPTS_LIMIT
) -> list[str]:
    """The distinct last user messages of the training rows, in order, at most ``limit``: the
    router learns the adapter's class from them. Each is cut to the admin API's 2,000
    characters; a blank one, which the API refuses, is left out."""
    prompts = (_last_user_message(e)[:PROMPT_CHARS] for e in examples)
    return list(itertools.islice(dict.fromkeys(p for p in prompts if p.strip()), limit))


def _last_user_message(example: Example) -> str:
    return next(m.content for m in reversed(example.prompt) if m.role == "user")
