"""What a training run leaves beside the weights: ``report.json``, the loss curve and the model card
(``README.md``), which states the data, the hyperparameters and the adapter against its base."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from adapters.trainer import TrainResult

REPORT_FILE = "report.json"
CURVE_FILE = "loss_curve.png"
CARD_FILE = "README.md"


def plot_losses(result: TrainResult, path: Path) -> None:
    """Training loss per step (and its running mean), validation loss, the kept step marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(result.train_losses) + 1)
    ax.plot(steps, result.train_losses, color="tab:blue", alpha=0.3, label="train loss (step)")
    window = max(1, len(result.train_losses) // 20)
    smooth = [
        sum(result.train_losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(result.train_losses))
    ]
    ax.plot(steps, smooth, color="tab:blue", label=f"train loss (mean of {window})")
    ax.plot(
        [v.step for v in result.validations],
        [v.loss for v in result.validations],
        "o-",
        color="tab:orange",
        label="validation loss",
    )
    ax.axvline(result.best_step, color="tab:green", linestyle="--", label=f"kept: step {result.best_step}")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss per answer token")
    ax.set_title("step 0 is the base model" + ("; stopped early" if result.stopped_early else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(value: float | None, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _counts(predictions: dict[str, int]) -> str:
    return ", ".join(f"{label}: {count}" for label, count in predictions.items())


def _general_set_name(forgetting: dict[str, Any]) -> str:
    source = forgetting.get("general_set", "shipped")  # reports written before --general-set
    if source == "shipped":
        return "the general set shipped with hybrid-serve"
    return f"the general set in `{source}`"


def _forgetting_section(forgetting: dict[str, Any]) -> list[str]:
    """Base against adapter on the general set (adapters/forgetting.py)."""
    base, adapter, change = forgetting["base"], forgetting["adapter"], forgetting["change"]
    margin = forgetting["margin"]
    outcome = (
        "**Beyond the margin:** " + "; ".join(forgetting["reasons"]) + "."
        if forgetting["forgets"]
        else "Within the margin."
    )
    return [
        "## General quality (forgetting)",
        "",
        f"The same two models on {_general_set_name(forgetting)}, unrelated to this adapter's data: "
        f"{forgetting['text_tokens']} tokens of prose, and {forgetting['chat_rows']} general questions "
        "and instructions (the perplexity of their reference answers, and how often the greedy answer "
        "contains the expected words).",
        "",
        "| | base model | adapter | change |",
        "|---|---|---|---|",
        f"| general text perplexity | {_fmt(base['text_perplexity'], 2)} | "
        f"{_fmt(adapter['text_perplexity'], 2)} | {change['text_perplexity_pct']:+.1f}% |",
        f"| general chat perplexity | {_fmt(base['chat_perplexity'], 2)} | "
        f"{_fmt(adapter['chat_perplexity'], 2)} | {change['chat_perplexity_pct']:+.1f}% |",
        f"| general chat accuracy | {_percent(base['chat_accuracy'])} | {_percent(adapter['chat_accuracy'])} "
        f"| {change['chat_accuracy_points']:+.1f} points |",
        "",
        f"Margins: a rise of at most {margin['text_perplexity_pct']:g}% in text perplexity and "
        f"{margin['chat_perplexity_pct']:g}% in chat perplexity, a fall of at most "
        f"{margin['accuracy_points']:g} points in accuracy. {outcome} "
        f"Measured in {forgetting['seconds']:.0f} s.",
        "",
    ]


def model_card(report: dict[str, Any]) -> str:
    """The Markdown card: what the adapter is for, how it was made, and how it compares."""
    data, evaluation, training = report["data"], report["evaluation"], report["training"]
    base, adapter = evaluation["base"], evaluation["adapter"]
    metric = evaluation["metric"]
    rows = [
        "| | base model | adapter |",
        "|---|---|---|",
        f"| validation loss | {_fmt(base['loss'])} | {_fmt(adapter['loss'])} |",
        f"| perplexity | {_fmt(base['perplexity'], 2)} | {_fmt(adapter['perplexity'], 2)} |",
    ]
    if metric is not None:
        rows.append(
            f"| {metric.replace('_', ' ')} | {_percent(base['metric'])} | {_percent(adapter['metric'])} |"
        )
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {report['base_model']}",
        "tags: [lora, hybrid-serve]",
        "---",
        "",
        f"# {report['name']}",
        "",
        f"A LoRA adapter for `{report['base_model']}`, trained with `hybrid-serve adapters train`.",
        "",
        "## Evaluation on the held-out rows",
        "",
        f"{evaluation['rows']} validation rows, the same prompts and greedy decoding for both; the base "
        "model is the same model with the adapter switched off.",
        "",
        *rows,
        "",
    ]
    if evaluation["majority_share"] is not None:
        lines += [
            f"Always answering the most common training label (`{evaluation['majority_label']}`) "
            f"scores {_percent(evaluation['majority_share'])}.",
            "",
            f"Predictions (label: count; `other` when none): base {_counts(base['predictions'])}; "
            f"adapter {_counts(adapter['predictions'])}.",
            "",
        ]
    lines += _forgetting_section(report["forgetting"])
    if report["verdict"]:
        lines += [f"**{report['verdict']}**", ""]
    lines += [
        "## Data",
        "",
        f"- training file: `{data['train_file']}`; validation: {data['validation_source']}",
        f"- curation: {data['train_curation']}",
        f"- {data['train_rows']} training rows, {data['validation_rows']} validation rows"
        + (
            f" ({data['leaked']} validation rows dropped as duplicates of training rows)"
            if data["leaked"]
            else ""
        ),
        "",
        "## Training",
        "",
        f"- {training['steps']} of {training['planned_steps']} planned optimizer steps in "
        f"{training['seconds']:.0f} s; best validation loss at step {training['best_step']}"
        + ("; stopped early (validation loss stopped improving)" if training["stopped_early"] else ""),
        f"- loss curve: `{CURVE_FILE}`; every figure: `{REPORT_FILE}`",
        "",
        "| hyperparameter | value |",
        "|---|---|",
        *(f"| {key} | {value} |" for key, value in report["hyperparameters"].items()),
        "",
    ]
    return "\n".join(lines)


def write_card(directory: Path, report: dict[str, Any], result: TrainResult) -> None:
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n")
    (directory / CARD_FILE).write_text(model_card(report))
    plot_losses(result, directory / CURVE_FILE)
