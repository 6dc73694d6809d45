"""The router benchmark's plot and printed summary, from the result ``bench/router_speed.py``
writes to ``router_speed.json``: everything they show is read from that result (backends,
probes, targets, the retrieval threshold), so a saved result can be drawn again.

    python -m bench.router_speed_report bench/results/router_speed.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = result["targets"]
    fig, axes = plt.subplots(1, 3, figsize=(18, 5.5))
    for ax, (backend, figures) in zip(axes[:2], result["backends"].items(), strict=True):
        for probe, samples in result["samples_ms"][backend].items():
            ordered = sorted(samples)
            label = f"{probe}: p50 {figures[probe]['p50_ms']:.1f}, p99 {figures[probe]['p99_ms']:.1f} ms"
            ax.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered), label=label)
        for target in ("decide_p50_ms", "decide_p99_ms"):
            ax.axvline(targets[target], color="red", linestyle=":")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of queries")
        ratio = figures["decide_to_embed_ratio_p50"]
        ax.set_title(f"{backend}: decide / embed {ratio:.2f}x at p50 (targets dotted)")
        ax.legend(fontsize=8, loc="lower right")
    threshold = result["thresholds"]
    bins = np.linspace(-0.2, 1.0, 49)
    for kind, label in (("pubmedqa", "PubMedQA questions (indexed)"), ("clinc", "CLINC150 (off-topic)")):
        share = threshold[kind]["share_at_or_above_threshold"]
        axes[2].hist(
            threshold[kind]["scores"], bins=bins, alpha=0.6, label=f"{label}: {share:.0%} >= threshold"
        )
    axes[2].axvline(threshold["rag_threshold"], color="red", linestyle=":")
    axes[2].set_xlabel("best passage cosine (Decision.retrieval_score)")
    axes[2].set_ylabel("queries")
    axes[2].set_title(
        f"rag threshold {threshold['rag_threshold']} over {result['setup']['chunks']['chunks']} chunks"
    )
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def summary(result: dict[str, Any]) -> None:
    def p50_p99(f: dict[str, float]) -> str:
        return f"{f['p50_ms']:6.2f} / {f['p99_ms']:6.2f}"

    for backend, f in result["backends"].items():
        print(
            f"{backend:5s} p50 / p99 ms: embed {p50_p99(f['embed'])}, decide {p50_p99(f['decide'])}, "
            f"measure {p50_p99(f['measure'])}; decide/embed {f['decide_to_embed_ratio_p50']:.2f}x / "
            f"{f['decide_to_embed_ratio_p99']:.2f}x; met {f['met']}"
        )
    parts = result["search_parts"]
    timed = {part: figures for part, figures in parts.items() if isinstance(figures, dict)}
    print("parts p50 / p99 ms: " + ", ".join(f"{k} {p50_p99(v)}" for k, v in timed.items()))
    print(f"rest of the hybrid search, median: {parts['rest_of_hybrid_search_median_ms']:.2f} ms")
    print(f"onnx vs torch: {json.dumps(result['accuracy'])}")
    threshold = result["thresholds"]
    for kind in ("pubmedqa", "clinc"):
        t = threshold[kind]
        print(
            f"{kind:8s} best passage: p5 {t['p5']:.3f} p50 {t['p50']:.3f} p95 {t['p95']:.3f}; "
            f">= {threshold['rag_threshold']}: {t['share_at_or_above_threshold']:.1%}"
        )
    print(f"meeting every target: {result['backends_meeting_all_targets']}; {result['runtime_s']:.0f} s")


if __name__ == "__main__":
    saved = Path(sys.argv[1])
    loaded = json.loads(saved.read_text())
    plot(loaded, saved.with_suffix(".png"))
    summary(loaded)
