"""``hybrid-serve router show|explain|fit|eval``.

``show``, ``explain`` and ``fit`` drive a running gateway's admin API (``HYBRID_GATEWAY_URL``,
``HYBRID_ADMIN_TOKEN``); ``eval`` runs the router in this process on CLINC150 (see
:mod:`service.router_eval`)."""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from service.admin_client import admin_client, error_message, report
from service.route_fit import BASE, Scored, fit_thresholds

EXPLAIN_WORKERS = 4


def add_parser(commands: Any) -> None:
    routing = commands.add_parser("router", help="inspect, fit and evaluate the router")
    verbs = routing.add_subparsers(dest="verb", required=True, metavar="VERB")

    show = verbs.add_parser("show", help="the thresholds in force and what the router knows of each adapter")
    show.set_defaults(handler=_show)

    explain = verbs.add_parser("explain", help="the route a prompt would take, without generating")
    explain.add_argument("prompt")
    explain.add_argument("--model", default="auto")
    explain.add_argument("--rag", choices=["auto", "on", "off"], default="auto")
    explain.set_defaults(handler=_explain)

    fit = verbs.add_parser(
        "fit",
        help="fit each adapter's threshold from labelled examples and store it in its manifest",
    )
    fit.add_argument(
        "data", type=Path, help='JSONL, one {"text": ..., "label": adapter name or "base"} per line'
    )
    fit.add_argument("--dry-run", action="store_true", help="print the thresholds, store nothing")
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
    with admin_client() as client:
        configured = client.get("/admin/router")
        if configured.status_code != 200:
            print(error_message(configured), file=sys.stderr)
            return 1
        adapters = {entry["name"] for entry in configured.json()["adapters"]}
        unknown = sorted({label for _, label in examples} - adapters - {BASE})
        if unknown:
            print(f"labels that name no registered adapter: {', '.join(unknown)}", file=sys.stderr)
            return 1
        scored = _score(client, examples)
        fits = fit_thresholds(scored)
        for name in sorted(adapters):
            fit = fits.get(name)
            if fit is None:
                print(f"{name}: no example scores highest for it; threshold left as it is")
                continue
            won = f"{fit.correct}/{fit.examples} of the examples it wins routed right"
            print(f"{name}: threshold {fit.threshold:.4f} ({won})")
            if not args.dry_run:
                response = client.patch(f"/admin/adapters/{name}", json={"threshold": fit.threshold})
                if response.status_code != 200:
                    print(error_message(response), file=sys.stderr)
                    return 1
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


def _score(client: httpx.Client, examples: list[tuple[str, str]]) -> list[Scored]:
    """Every example's similarity to every adapter, as the gateway computes it (``rag: off``:
    retrieval plays no part in the adapter choice)."""

    def scores_of(text: str) -> dict[str, float]:
        body = {"model": "auto", "rag": "off", "messages": [{"role": "user", "content": text}]}
        response = client.post("/admin/router/explain", json=body)
        if response.status_code != 200:
            raise SystemExit(error_message(response))
        adapters: dict[str, float] = response.json()["route"]["scores"]["adapters"]
        return adapters

    with ThreadPoolExecutor(EXPLAIN_WORKERS) as pool:
        all_scores = list(pool.map(scores_of, [text for text, _ in examples]))
    return [Scored(label, scores) for (_, label), scores in zip(examples, all_scores, strict=True)]


def _eval(args: argparse.Namespace) -> int:
    from service.router_eval import run_evaluation

    run_evaluation(args.data, args.out)
    return 0
