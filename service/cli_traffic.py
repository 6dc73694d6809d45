"""``hybrid-serve traffic export``: the traffic log (``HYBRID_TRAFFIC_LOG``) as labelled rows.

Each row's label is the model that answered: the adapter the router chose (or ``base``) for an
automatic request, the one the client named for a pinned one. Two forms:

- ``fit`` (default): ``{"text": prompt, "label": adapter or "base"}`` per line, what
  ``hybrid-serve router fit`` takes;
- ``train``: ``{"messages": [{"role": "user", "content": prompt}], "label": ...}`` per line. The
  log keeps no answers, so these rows **need answers**: ``adapters train`` refuses them (its
  last message must be the assistant's) until each gets its assistant turn appended.

Left out: automatic requests the classifier did not score (none fitted, or the index was
down: the base model answered by default, which labels nothing), empty prompts, repeats of
a (prompt, label) row, and prompts logged with different labels (which one is right is not
known). ``--min-confidence`` keeps only automatic rows whose label had at least that
probability; pinned rows are the client's own label and are kept (``--auto-only`` drops them).
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from service.route_model import BASE
from service.traffic_log import TrafficLine, TrafficLogError, read_log

Form = Literal["fit", "train"]
_DURATION = re.compile(r"([0-9]+)([smhd])")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def add_parser(commands: Any) -> None:
    traffic = commands.add_parser("traffic", help="the traffic log: labelled prompts out of it")
    verbs = traffic.add_subparsers(dest="verb", required=True, metavar="VERB")
    export = verbs.add_parser(
        "export",
        help="write the logged prompts as labelled JSONL, for `router fit` (default) or `adapters train`",
    )
    export.add_argument("--log", type=Path, required=True, help="the traffic log (its .1 is read too)")
    export.add_argument("--out", type=Path, required=True, help="the JSONL file to write")
    export.add_argument("--adapter", help="only rows labelled with this adapter (or 'base')")
    export.add_argument(
        "--min-confidence",
        type=probability,
        help="only automatic rows whose label had at least this probability (0 to 1)",
    )
    export.add_argument("--auto-only", action="store_true", help="leave out requests that named their model")
    export.add_argument(
        "--format",
        choices=["fit", "train"],
        default="fit",
        help='fit: {"text", "label"}; train: {"messages": [user turn]}, which need answers added',
    )
    export.add_argument("--since", type=since, help="only lines this recent: 30m, 24h, 7d or an ISO date")
    export.set_defaults(handler=_export)


def probability(value: str) -> float:
    """An argparse type: a number in [0, 1]."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.0 <= number <= 1.0:
        raise argparse.ArgumentTypeError(f"{value} is not between 0 and 1")
    return number


def since(value: str, now: datetime | None = None) -> datetime:
    """An argparse type: ``30m``, ``24h``, ``7d`` (that long ago) or an ISO 8601 date or time
    (UTC unless it says otherwise)."""
    duration = _DURATION.fullmatch(value.strip())
    if duration:
        amount, unit = duration.groups()
        return (now or datetime.now(UTC)) - timedelta(**{_UNITS[unit]: int(amount)})
    try:
        moment = datetime.fromisoformat(value.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a duration (30m, 24h, 7d) or an ISO date"
        ) from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass
class Exported:
    rows: list[dict[str, Any]] = field(default_factory=list)
    labels: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    """Why lines were left out: unscored, empty, pinned, other label, below confidence,
    duplicate, conflicting."""


def export_rows(
    lines: Iterable[TrafficLine],
    *,
    form: Form = "fit",
    adapter: str | None = None,
    min_confidence: float | None = None,
    auto_only: bool = False,
) -> Exported:
    """The labelled rows of ``lines`` (see the module docstring), in the log's order."""
    found: dict[str, set[str]] = {}
    order: list[tuple[str, str]] = []
    out = Exported()
    for line in lines:
        label = _label(line, min_confidence, auto_only, out.skipped)
        if label is None:
            continue
        labels = found.setdefault(line.prompt, set())
        if label in labels:
            out.skipped["duplicate"] += 1
            continue
        labels.add(label)
        order.append((line.prompt, label))
    for text, label in order:
        # Judged before --adapter: a prompt also logged under another label stays ambiguous.
        if len(found[text]) > 1:
            out.skipped["conflicting"] += 1
        elif adapter is not None and label != adapter:
            out.skipped["other label"] += 1
        else:
            out.labels[label] += 1
            if form == "fit":
                out.rows.append({"text": text, "label": label})
            else:
                out.rows.append({"messages": [{"role": "user", "content": text}], "label": label})
    return out


def _label(
    line: TrafficLine, min_confidence: float | None, auto_only: bool, skipped: Counter[str]
) -> str | None:
    if not line.prompt.strip():
        skipped["empty"] += 1
        return None
    if line.pinned:
        if auto_only:
            skipped["pinned"] += 1
            return None
        return line.adapter or BASE
    if line.router is None:
        skipped["unscored"] += 1
        return None
    if min_confidence is not None and line.router.confidence < min_confidence:
        skipped["below confidence"] += 1
        return None
    return line.adapter or BASE


def _export(args: argparse.Namespace) -> int:
    try:
        exported = export_rows(
            read_log(args.log, since=args.since),
            form=args.format,
            adapter=args.adapter,
            min_confidence=args.min_confidence,
            auto_only=args.auto_only,
        )
    except TrafficLogError as exc:
        raise SystemExit(f"hybrid-serve traffic export: {exc}") from None
    skipped = ", ".join(f"{n} {why}" for why, n in sorted(exported.skipped.items())) or "none"
    if not exported.rows:
        raise SystemExit(
            f"hybrid-serve traffic export: nothing to export from {args.log} (left out: {skipped})"
        )
    # Written aside and renamed: an interrupted export never leaves half a file under its name.
    partial = args.out.with_name(f".{args.out.name}.partial")
    with partial.open("w", encoding="utf-8") as out:
        out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in exported.rows)
    os.replace(partial, args.out)
    counts = ", ".join(f"{label} {n}" for label, n in sorted(exported.labels.items()))
    print(f"wrote {len(exported.rows)} rows to {args.out} ({counts}); left out: {skipped}")
    if args.format == "train":
        print("these rows need answers: append each one's assistant turn before `adapters train`")
    return 0
