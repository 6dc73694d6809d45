"""``hybrid-serve adapters add|list|show|rm``: the admin API from the command line (the gateway's
URL and admin token come from the settings: ``HYBRID_GATEWAY_URL``, ``HYBRID_ADMIN_TOKEN``)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from service import cli_train
from service.admin_client import admin_client, report, upload_adapter


def add_parser(commands: Any) -> None:
    adapters = commands.add_parser("adapters", help="register, list, show and remove LoRA adapters")
    verbs = adapters.add_subparsers(dest="verb", required=True, metavar="VERB")

    add = verbs.add_parser(
        "add", help="upload a PEFT adapter directory (or name one in the import directory)"
    )
    add.add_argument("name")
    add.add_argument(
        "source",
        help="a local PEFT directory to upload, or with --server-path a path in HYBRID_ADAPTER_IMPORT_DIR",
    )
    add.add_argument(
        "--server-path", action="store_true", help="SOURCE is on the gateway, inside its import directory"
    )
    add.add_argument("--description", default="")
    add.add_argument(
        "--example", action="append", default=[], dest="examples", help="an example prompt (repeat)"
    )
    add.add_argument("--threshold", type=float)
    add.add_argument(
        "--no-retrieval",
        action="store_true",
        help="requests this adapter serves never get retrieved context",
    )
    add.add_argument("--replace", action="store_true", help="swap an existing adapter of that name")
    add.add_argument(
        "--force",
        action="store_true",
        help="upload even when the directory's report.json (from `adapters train`) says it forgets",
    )
    add.set_defaults(handler=_add)

    listing = verbs.add_parser("list", help="every registered adapter")
    listing.set_defaults(handler=_list)
    show = verbs.add_parser("show", help="one adapter's record")
    show.add_argument("name")
    show.set_defaults(handler=_show)
    remove = verbs.add_parser("rm", help="unload and delete an adapter")
    remove.add_argument("name")
    remove.set_defaults(handler=_remove)
    cli_train.add_parser(verbs)


def _add(args: argparse.Namespace) -> int:
    refused = None if args.server_path or args.force else forgetting_refusal(Path(args.source))
    if refused:
        print(f"not registered: {refused} (--force registers it)", file=sys.stderr)
        return 1
    fields: dict[str, Any] = {
        "name": args.name,
        "description": args.description,
        "examples": args.examples,
        "replace": args.replace,
        "allow_retrieval": not args.no_retrieval,
    }
    if args.threshold is not None:
        fields["threshold"] = args.threshold
    with admin_client() as client:
        if args.server_path:
            return report(client.post("/admin/adapters", json={**fields, "path": args.source}))
        return report(upload_adapter(client, Path(args.source), fields))


def forgetting_refusal(directory: Path) -> str | None:
    """Why the ``report.json`` that ``adapters train`` left in ``directory`` refuses it (it forgets
    beyond the margin it was trained with); None when it does not, or when there is no such report
    (an adapter made elsewhere)."""
    try:
        forgetting = json.loads((directory / "report.json").read_text())["forgetting"]
        forgets, reasons = forgetting["forgets"], forgetting["reasons"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if forgets is not True:
        return None
    return "its report says it forgets what the base model could do: " + "; ".join(map(str, reasons))


def _list(args: argparse.Namespace) -> int:
    with admin_client() as client:
        return report(client.get("/admin/adapters"))


def _show(args: argparse.Namespace) -> int:
    with admin_client() as client:
        return report(client.get(f"/admin/adapters/{args.name}"))


def _remove(args: argparse.Namespace) -> int:
    with admin_client() as client:
        return report(client.delete(f"/admin/adapters/{args.name}"))
