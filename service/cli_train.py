"""``hybrid-serve adapters train``: fine-tune a LoRA adapter on a JSONL file, compare it with the
base model, and optionally register it with a running gateway (``--register``)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapters.forgetting import CHAT_FILE, TEXT_FILE, ForgettingMargin, read_general_set
from adapters.train_config import DEFAULT_TARGETS, TrainConfig

if TYPE_CHECKING:
    from adapters.fine_tune import FineTuneResult
    from adapters.training_data import Example

_DEFAULTS = TrainConfig()
_MARGIN = ForgettingMargin()


def add_parser(verbs: Any) -> None:
    train = verbs.add_parser(
        "train",
        help="fine-tune a LoRA adapter on chat examples, evaluate it against the base model",
        description="Curates the data (duplicates, empty and over-long rows), splits it, trains with "
        "early stopping on validation loss, compares adapter and base on the held-out rows, and "
        "writes OUTPUT/NAME: the PEFT files, README.md (model card), loss_curve.png, report.json.",
    )
    train.add_argument(
        "--data", required=True, type=Path, help='JSONL: {"messages": [...]} or prompt/completion'
    )
    train.add_argument("--name", required=True, help="the adapter's name (and its directory's)")
    train.add_argument("--output", required=True, type=Path, help="directory the adapter is written under")
    train.add_argument("--validation", type=Path, help="held-out JSONL (default: split off the data)")
    train.add_argument(
        "--validation-fraction", type=float, default=_DEFAULTS.validation_fraction, help="%(default)s"
    )
    train.add_argument(
        "--base-model", type=Path, help="a Hugging Face causal LM directory (default: the bundled model)"
    )
    train.add_argument(
        "--base-model-id",
        help="the name the adapter's config gives its base (default: the bundled model's Hugging Face "
        "id, or the directory's path)",
    )
    train.add_argument("--rank", type=int, default=_DEFAULTS.rank, help="LoRA rank (%(default)s)")
    train.add_argument("--alpha", type=float, default=_DEFAULTS.alpha, help="LoRA alpha (%(default)s)")
    train.add_argument("--dropout", type=float, default=_DEFAULTS.dropout, help="LoRA dropout (%(default)s)")
    train.add_argument(
        "--target-modules",
        default=",".join(DEFAULT_TARGETS),
        help="comma-separated module names (%(default)s)",
    )
    train.add_argument("--learning-rate", type=float, default=_DEFAULTS.learning_rate, help="%(default)s")
    train.add_argument("--epochs", type=float, default=_DEFAULTS.epochs, help="%(default)s")
    train.add_argument("--batch-size", type=int, default=_DEFAULTS.batch_size, help="%(default)s")
    train.add_argument(
        "--gradient-accumulation", type=int, default=_DEFAULTS.gradient_accumulation, help="%(default)s"
    )
    train.add_argument(
        "--max-length",
        type=int,
        default=_DEFAULTS.max_length,
        help="longest row in tokens; longer ones are removed (%(default)s)",
    )
    train.add_argument("--eval-steps", type=int, help="steps between validations (default: 4 per epoch)")
    train.add_argument(
        "--patience",
        type=int,
        default=_DEFAULTS.patience,
        help="validations without improvement (%(default)s)",
    )
    train.add_argument(
        "--min-delta",
        type=float,
        default=_DEFAULTS.min_delta,
        help="how much lower a validation loss must be to count as better (%(default)s)",
    )
    train.add_argument("--seed", type=int, default=_DEFAULTS.seed, help="%(default)s")
    train.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="%(default)s")
    train.add_argument(
        "--precision",
        choices=["auto", "bf16", "fp32"],
        default="auto",
        help="auto: bf16 autocast where the hardware has it (%(default)s)",
    )
    train.add_argument(
        "--force",
        action="store_true",
        help="train on fewer than 50 rows; register an adapter that does not beat the base or forgets",
    )
    train.add_argument("--overwrite", action="store_true", help="replace OUTPUT/NAME if it exists")
    train.add_argument(
        "--resume",
        action="store_true",
        help="go on from the latest checkpoint of an interrupted run (same data and settings)",
    )
    train.add_argument(
        "--forgetting-margin",
        type=float,
        default=_MARGIN.text_perplexity_pct,
        metavar="PERCENT",
        help="the largest accepted rise of the general text perplexity against the base; beyond any "
        "forgetting margin --register refuses the adapter (%(default)s)",
    )
    train.add_argument(
        "--forgetting-chat-margin",
        type=float,
        default=_MARGIN.chat_perplexity_pct,
        metavar="PERCENT",
        help="the largest accepted rise of the general chat answers' perplexity (%(default)s)",
    )
    train.add_argument(
        "--forgetting-accuracy-margin",
        type=float,
        default=_MARGIN.accuracy_points,
        metavar="POINTS",
        help="the largest accepted fall of the general chat accuracy (%(default)s)",
    )
    train.add_argument(
        "--general-set",
        type=Path,
        metavar="DIR",
        help=f"measure forgetting on this general set ({CHAT_FILE} and {TEXT_FILE} in DIR, in the shipped "
        "format) instead of the shipped one",
    )
    train.add_argument("--register", action="store_true", help="register the adapter with the gateway")
    train.add_argument("--description", default="", help="for --register: what the adapter is for")
    train.add_argument(
        "--example",
        action="append",
        default=[],
        dest="examples",
        help="for --register: an example prompt for the router (repeat; default: 20 from the data)",
    )
    train.add_argument("--replace", action="store_true", help="for --register: swap an adapter of that name")
    train.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from adapters.extras import require

    # Before the data is read: a gateway-only install (no torch) cannot train.
    require("train", "adapters train", "torch", "transformers", "peft", "accelerate", "matplotlib")
    from adapters.errors import AdapterValidationError
    from adapters.fine_tune import TrainRequest, fine_tune
    from adapters.training_data import TrainingDataError
    from service.bundled_model import HF_ID, model_dir
    from service.settings import load_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = load_settings()
    try:
        config = TrainConfig(
            rank=args.rank,
            alpha=args.alpha,
            dropout=args.dropout,
            target_modules=tuple(m.strip() for m in args.target_modules.split(",") if m.strip()),
            learning_rate=args.learning_rate,
            epochs=args.epochs,
            batch_size=args.batch_size,
            gradient_accumulation=args.gradient_accumulation,
            max_length=args.max_length,
            eval_steps=args.eval_steps,
            patience=args.patience,
            min_delta=args.min_delta,
            validation_fraction=args.validation_fraction,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
        )
        if args.base_model is None:
            base, base_id = model_dir(settings.cache_dir), args.base_model_id or HF_ID
            if not base.is_dir():
                raise ValueError(f"the bundled model is not built at {base}: run `make model` first")
        else:
            base, base_id = args.base_model, args.base_model_id
        request = TrainRequest(
            args.data,
            args.name,
            args.output,
            base,
            base_id,
            config,
            validation_file=args.validation,
            force=args.force,
            overwrite=args.overwrite,
            resume=args.resume,
            max_rank=settings.max_lora_rank,
            forgetting_margin=ForgettingMargin(
                args.forgetting_margin, args.forgetting_chat_margin, args.forgetting_accuracy_margin
            ),
            general=None if args.general_set is None else read_general_set(args.general_set),
        )
        result = fine_tune(request)
    except (TrainingDataError, AdapterValidationError, ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{result.directory}: {result.report['verdict']}")
    if not args.register:
        return 0
    refused = refusals(result)
    if refused and not args.force:
        for reason in refused:
            print(f"not registered: {reason} (--force registers it)", file=sys.stderr)
        return 1
    return _register(args, result)


def refusals(result: FineTuneResult) -> list[str]:
    """Why ``--register`` leaves this adapter unregistered (empty: it registers it)."""
    found = []
    if not result.beats_base:
        found.append("the adapter does not beat the base model")
    if result.forgets:
        found.append(
            "the adapter forgets what the base model could do: " + "; ".join(result.forgetting.reasons)
        )
    return found


def _register(args: argparse.Namespace, result: Any) -> int:
    from service.admin_client import admin_client, report, upload_adapter

    with admin_client() as client:
        return report(upload_adapter(client, result.directory, registration_fields(args, result.split.train)))


def registration_fields(args: argparse.Namespace, train: Sequence[Example]) -> dict[str, Any]:
    """The registration sent by ``--register``: the routing examples (given, or 20 from the
    training split) and every distinct prompt of the training split, which the router learns
    the adapter's class from."""
    from adapters.fine_tune import routing_examples, training_prompts

    return {
        "name": args.name,
        "description": args.description,
        "examples": args.examples or routing_examples(tuple(train), 20, args.seed),
        "training_prompts": training_prompts(tuple(train)),
        "replace": args.replace,
    }
