"""``hybrid-serve router show|explain|fit|eval|drift``.

``show``, ``explain`` and ``fit`` drive a running gateway's admin API (``HYBRID_GATEWAY_URL``,
``HYBRID_ADMIN_TOKEN``); ``eval`` runs the router in this process on CLINC150 (see
:mod:`service.router_eval`); ``drift`` compares the traffic log with the stored router's fit
rows in this process, reading the gateway's stores (see :mod:`service.drift`)."""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from service.admin_client import admin_client, error_message, report
from service.cli_traffic import since
from service.drift import PSI_DRIFT, ClassDrift


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

    drift = verbs.add_parser(
        "drift",
        help="recent traffic (the traffic log) against the stored router's fit rows: shares, "
        "confidence (PSI, KS), abstentions and embedding distance per class (no gateway needed)",
    )
    drift.add_argument("--log", type=Path, help="the traffic log (default: HYBRID_TRAFFIC_LOG)")
    drift.add_argument("--since", type=since, help="only requests this recent: 30m, 24h, 7d or an ISO date")
    drift.add_argument("--version", type=int, help="the router version to compare with (default: current)")
    drift.add_argument(
        "--psi-threshold", type=float, default=PSI_DRIFT, help="flag a class above this confidence PSI"
    )
    drift.add_argument(
        "--min-samples", type=int, default=20, help="queries a class needs on each side to be judged"
    )
    drift.add_argument(
        "--max-queries", type=int, default=5000, help="the most recent automatic requests compared"
    )
    drift.add_argument("--json", action="store_true", help="print the report as JSON")
    drift.set_defaults(handler=_drift)


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


def _drift(args: argparse.Namespace) -> int:
    import numpy as np

    from service import drift
    from service.drift_reference import NoReferenceError, load_reference
    from service.knowledge import embedder_from_settings
    from service.settings import load_settings
    from service.traffic_log import TrafficLogError, read_log

    settings = load_settings()
    log = args.log or settings.traffic_log
    if log is None:
        raise SystemExit("hybrid-serve router drift: pass --log FILE or set HYBRID_TRAFFIC_LOG")
    try:
        lines = list(read_log(log, since=args.since))
    except TrafficLogError as exc:
        raise SystemExit(f"hybrid-serve router drift: {exc}") from None
    scored = [(line.prompt, line.router) for line in lines if not line.pinned and line.router is not None]
    scored = scored[-args.max_queries :]
    if not scored:
        raise SystemExit(f"hybrid-serve router drift: no automatic request the router scored in {log}")
    embedder = embedder_from_settings(settings)
    try:
        reference = load_reference(settings.adapter_store_dir, embedder, args.version)
    except NoReferenceError as exc:
        raise SystemExit(f"hybrid-serve router drift: {exc}") from None
    recent = drift.Routed(
        decided=[view.decided for _, view in scored],
        confidence=np.array([view.confidence for _, view in scored], dtype=np.float64),
        best=[view.best_adapter for _, view in scored],
        abstained=np.array([view.abstained for _, view in scored], dtype=bool),
        vectors=embedder.embed([prompt for prompt, _ in scored]),
    )
    extra = sorted(set(recent.decided) - set(reference.classes))  # adapters the version does not know
    result = drift.compare(
        reference.routed,
        recent,
        [*reference.classes, *extra],
        reference.fit_share,
        reference.centroids,
        psi_threshold=args.psi_threshold,
        min_samples=args.min_samples,
    )
    versions = Counter(view.version for _, view in scored)
    summary = {
        "router": {
            "version": reference.version,
            "created_at": reference.created_at,
            "rows": reference.rows,
            "exact": reference.exact,
            "abstain_threshold": reference.abstain,
        },
        "traffic": {
            "log": str(log),
            "since": args.since.isoformat() if args.since else None,
            "first": lines[0].time.isoformat(timespec="seconds") if lines else None,
            "last": lines[-1].time.isoformat(timespec="seconds") if lines else None,
            "compared": len(scored),
            "pinned": sum(line.pinned for line in lines),
            "unscored": sum(not line.pinned and line.router is None for line in lines),
            "versions": {str(v): n for v, n in sorted(versions.items(), key=lambda item: str(item[0]))},
        },
        **result.to_json(),
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        _print_drift(summary, result.classes)
    return 0


def _print_drift(summary: dict[str, Any], classes: list[ClassDrift]) -> None:
    router, traffic = summary["router"], summary["traffic"]
    rows = "its own fit rows" if router["exact"] else "the adapters' current prompts (changed since the fit)"
    print(f"router v{router['version']} ({router['created_at']}): {router['rows']} rows out of fold, {rows}")
    print(
        f"against {traffic['compared']} automatic requests of {traffic['log']} "
        f"({traffic['first']} to {traffic['last']}); also {traffic['pinned']} pinned, "
        f"{traffic['unscored']} not scored; router versions: "
        + ", ".join(f"v{v} {n}" for v, n in traffic["versions"].items())
    )
    header = ["class", "recent", "share now/fit", "fit rows", "confidence now/fit", "PSI", "KS"]
    header += ["abstain now/fit", "cosine now/fit", "drift"]
    table = [header]
    for row in classes:
        table.append(
            [
                row.name,
                str(row.recent),
                f"{_pct(row.recent_share)}/{_pct(row.reference_share)}",
                _pct(row.fit_share),
                f"{_num(row.confidence_recent)}/{_num(row.confidence_reference)}",
                _num(row.psi),
                _num(row.ks),
                f"{_pct(row.abstain_recent)}/{_pct(row.abstain_reference)}",
                f"{_num(row.cosine_recent)}/{_num(row.cosine_reference)}",
                "DRIFT" if row.drifted else "",
            ]
        )
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip())
    print(f"class shares PSI {summary['share_psi']:.3f}")
    threshold = summary["psi_threshold"]
    drifted = summary["drifted"]
    if drifted:
        print(f"drifted (confidence PSI > {threshold:.2f}): {', '.join(drifted)}")
    else:
        print(f"no class drifted (confidence PSI > {threshold:.2f})")
    for row in classes:
        if row.note and not row.drifted:
            print(f"  {row.name}: {row.note}")


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"
