"""What ``hybrid-serve router eval`` shows of its report: ``router_eval.png`` (a confusion matrix
per method and the classifiers' abstain-threshold trade-off curves) and the table it prints
(see :mod:`service.router_eval`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from adapters.extras import require

# At import, which `router eval` does before it evaluates: a missing matplotlib is said in a second,
# not after minutes of evaluation.
require("plot", "router eval's figure", "matplotlib")

TITLES = {
    ("out_of_the_box", "classifier"): "out of the box: learned router",
    ("out_of_the_box", "threshold_router"): "out of the box: threshold router (default threshold)",
    ("fitted", "classifier"): "fitted: learned router",
    ("fitted", "threshold_router"): "fitted: threshold router (fitted thresholds)",
    ("fitted", "centroid_baseline"): "fitted: nearest centroid, one threshold",
}
PANELS = (
    (0, 0, "out_of_the_box", "classifier"),
    (0, 1, "out_of_the_box", "threshold_router"),
    (1, 0, "fitted", "classifier"),
    (1, 1, "fitted", "threshold_router"),
    (1, 2, "fitted", "centroid_baseline"),
)
COLOURS = {"out_of_the_box": "tab:orange", "fitted": "tab:blue"}


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(21, 13.5))
    for row, column, setting, method in PANELS:
        result = report["settings"][setting]["methods"][method]
        _confusion(axes[row][column], report["labels"], result, TITLES[(setting, method)])
    _trade_off(axes[0][2], report)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _confusion(ax: Any, labels: list[str], result: dict[str, Any], title: str) -> None:
    matrix = np.array(result["confusion"], dtype=float)
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(labels)):
        for j in range(len(labels)):
            if matrix[i, j]:
                colour = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, int(matrix[i, j]), ha="center", va="center", fontsize=7, color=colour)
    score = result["score"]
    ax.set_title(
        f"{title}\nin-domain {score['in_domain_accuracy']:.1%}, base recall {score['base_recall']:.1%}, "
        f"macro-F1 {score['macro_f1']:.3f}",
        fontsize=9,
    )
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xlabel("routed to")
    ax.set_ylabel("belongs to")


def _trade_off(ax: Any, report: dict[str, Any]) -> None:
    from matplotlib.patches import Rectangle

    for setting, entry in report["settings"].items():
        colour = COLOURS.get(setting, "tab:gray")
        classifier = entry["methods"]["classifier"]
        sweep = classifier["abstain_sweep"]
        recall = [point["base_recall"] for point in sweep]
        accuracy = [point["in_domain_accuracy"] for point in sweep]
        label = setting.replace("_", " ")
        ax.plot(recall, accuracy, "o-", color=colour, markersize=3, label=f"{label}: abstain 0.05 to 0.95")
        for point in (sweep[0], sweep[-1]):
            ax.annotate(
                f"{point['abstain']:.2f}",
                (point["base_recall"], point["in_domain_accuracy"]),
                fontsize=7,
                color=colour,
            )
        score = classifier["score"]
        ax.plot(
            score["base_recall"],
            score["in_domain_accuracy"],
            "*",
            color=colour,
            markersize=16,
            markeredgecolor="black",
            label=f"{label}: fitted abstain {classifier['abstain']:.2f}",
        )
        target = entry["targets"]
        ax.add_patch(
            Rectangle(
                (target["base_recall"], target["in_domain_accuracy"]),
                1 - target["base_recall"],
                1 - target["in_domain_accuracy"],
                fill=False,
                linestyle="--",
                edgecolor=colour,
                label=f"{label} target",
            )
        )
    ax.set_xlabel("base recall (held out)")
    ax.set_ylabel("in-domain accuracy (held out)")
    ax.set_title(
        "learned router: abstain threshold trade-off\n(the threshold used is fitted out of fold)", fontsize=9
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")


def table(report: dict[str, Any]) -> str:
    """The short summary printed to stdout."""
    lines = [f"{'setting':15s} {'method':18s} in-domain  base rec.  macro-F1   small_talk  meta    oos"]
    for setting, entry in report["settings"].items():
        for method, result in entry["methods"].items():
            score, by_source = result["score"], result["base_recall_by_source"]
            sources = "  ".join(
                f"{by_source.get(s, float('nan')):.3f}" for s in ("small_talk", "meta", "oos")
            )
            lines.append(
                f"{setting:15s} {method:18s} {score['in_domain_accuracy']:.4f}     "
                f"{score['base_recall']:.4f}     {score['macro_f1']:.4f}     {sources}"
            )
        classifier = entry["methods"]["classifier"]
        lines.append(
            f"  {setting}: classifier abstain {classifier['abstain']:.2f}, temperature "
            f"{classifier['temperature']:.3f}, fit {classifier['fit_seconds']:.1f} s, decision "
            f"{classifier['decision_ms_median']:.3f} ms/query"
        )
        lines.append(f"  {setting}: targets {entry['targets']} met by the classifier: {entry['targets_met']}")
    return "\n".join(lines)
