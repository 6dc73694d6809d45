"""``hybrid-serve router show|explain|fit|eval``.

``show``, ``explain`` and ``fit`` drive a running gateway's admin API (``HYBRID_GATEWAY_URL``,
``HYBRID_ADMIN_TOKEN``); ``eval`` runs the router in this process on CLINC150 (see
:mod:`service.router_eval`)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service.admin_client import admin_client, error_message, report


def add_parser(commands: Any) -> None:
    routing = commands.add_parser("router", help="inspect, fit and evaluate the router")
    verbs = routing.add_subparsers(dest="verb", required=True, metavar="VERB")

    show = verbs.add_parser("show", help="the classifier in force (version, data, figures) and each adapter")
    show.set_defaults(handler=_show)

    explain = verbs.add_parser("explain", help="the route a prompt would take, without generating")
    explain.add_argument("prompt")
    explain.add_argument("--model", default="auto")
    explain.add_argument("--rag", choices=["auto", "on", "off"], default="auto")
    explain.set_defaults(handler=_explain)

    fit = verbs.add_parser(
        "fit",
        help="fit the router's classifier with labelled prompts (they replace the stored ones)",
    )
    fit.add_argument(
        "data", type=Path, help='JSONL, one {"text": ..., "label": adapter name or "base"} per line'
    )
    fit.add_argument("--dry-run", action="store_true", help="fit and print the figures, store nothing")
    fit.set_defaults(handler=_fit)

    evaluate = verbs.add_parser(
        "eval",
        help="CLINC150 routing: the learned router against the threshold router and a centroid "
        "baseline, out of the box and fitted on 10 prompts per intent (no gateway needed)",
    )
    evaluate.add_argument(
        "--data", type=Path, default=None, help="the clinc150 folder (default: ../shared/data/clinc150)"
    )
    evaluate.add_argument("--out", type=Path, default=Path("bench/results"), help="where the JSON and PNG go")
    evaluate.set_defaults(handler=_eval)


def _show(args: argparse.Namespace) -> int:
    with admin_client() as client:
        return report(client.get("/admin/router"))


def _explain(args: argparse.Namespace) -> int:
    body = {"model": args.model, "rag": args.rag, "messages": [{"role": "user", "content": args.prompt}]}
    with admin_client() as client:
        return report(client.post("/admin/router/explain", json=body))


def _fit(args: argparse.Namespace) -> int:
    examples = _read_examples(args.data)
    body = {"examples": [{"text": text, "label": label} for text, label in examples], "dry_run": args.dry_run}
    with admin_client() as client:
        # A fit embeds every prompt and cross-validates: seconds to a minute on a small CPU
        # (the admin client's read timeout allows ten).
        response = client.post("/admin/router/fit", json=body)
    if response.status_code != 200:
        print(error_message(response), file=sys.stderr)
        return 1
    fitted = response.json()
    validation = fitted["validation"]
    where = "stored as version {}".format(fitted["version"]) if fitted["stored"] else "dry run, not stored"
    print(f"router fitted on {validation['rows']} prompts in {fitted['fit_seconds']} s ({where})")
    print(f"classes: {', '.join(fitted['classes'])}")
    print(
        f"out of fold ({validation['folds']} folds): "
        f"in-domain accuracy {validation['in_domain_accuracy']:.4f}, "
        f"base recall {validation['base_recall']:.4f}, macro-F1 {validation['macro_f1']:.4f}, "
        f"calibration error {validation['calibration_error']:.4f}"
    )
    print(f"abstain threshold {fitted['abstain_threshold']:.2f}, temperature {fitted['temperature']:.3f}")
    for name, counts in fitted["data"].items():
        print(f"  {name}: " + ", ".join(f"{origin} {n}" for origin, n in sorted(counts.items())))
    return 0


def _read_examples(path: Path) -> list[tuple[str, str]]:
    examples = []
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                text, label = row["text"], row["label"]
            except (ValueError, KeyError, TypeError):
                raise SystemExit(f'{path}:{number}: expected {{"text": ..., "label": ...}}') from None
            if not isinstance(text, str) or not isinstance(label, str) or not text.strip():
                raise SystemExit(f"{path}:{number}: text and label must be non-empty strings")
            examples.append((text, label))
    if not examples:
        raise SystemExit(f"{path}: no examples")
    return examples


def _eval(args: argparse.Namespace) -> int:
    from service.router_eval import run_evaluation

    run_evaluation(args.data, args.out)
    return 0
