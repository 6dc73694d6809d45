"""``hybrid-serve ingest`` and ``hybrid-serve collections list|rm``: the collections admin API
from the command line.

``ingest`` uploads one file per request, so a bad file fails alone and says so; a directory is
walked for the formats the index reads, and each file's source is its path relative to the
directory given (``policies/refunds.md``), so equal names in sub-directories stay distinct.
"""

from __future__ import annotations

import argparse
import mimetypes
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
from tqdm import tqdm

from index.loaders import SUPPORTED_EXTENSIONS
from service.admin_client import admin_client, error_message, report


def add_parsers(commands: Any) -> None:
    ingest = commands.add_parser(
        "ingest", help="upload documents (text, Markdown, HTML, PDF, JSONL) into a collection"
    )
    ingest.add_argument("paths", nargs="+", metavar="PATH", help="files, or directories to walk")
    ingest.add_argument("--collection", required=True, help="the collection to ingest into")
    volatile = ingest.add_mutually_exclusive_group()
    volatile.add_argument(
        "--volatile", action="store_true", default=None, help="mark the collection volatile (news, prices)"
    )
    volatile.add_argument("--no-volatile", dest="volatile", action="store_false", help="clear the mark")
    ingest.set_defaults(handler=_ingest)

    collections = commands.add_parser("collections", help="list collections, remove one or a document")
    verbs = collections.add_subparsers(dest="verb", required=True, metavar="VERB")
    verbs.add_parser("list", help="every collection with its counts").set_defaults(handler=_list)
    remove = verbs.add_parser("rm", help="delete a collection, or with --source one document of it")
    remove.add_argument("name")
    remove.add_argument("--source", help="delete only the document with this source")
    remove.set_defaults(handler=_remove)


def files_to_ingest(paths: list[str]) -> Iterator[tuple[Path, str]]:
    """(file, source) for every readable file named or found under a named directory."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                relative = found.relative_to(path)
                hidden = any(part.startswith(".") for part in relative.parts)
                if found.is_file() and not hidden and found.suffix.lower() in SUPPORTED_EXTENSIONS:
                    yield found, relative.as_posix()
        elif path.is_file():
            yield path, path.name
        else:
            raise SystemExit(f"{raw}: no such file or directory")


def _ingest(args: argparse.Namespace) -> int:
    files = list(files_to_ingest(args.paths))
    if not files:
        print(
            f"nothing to ingest: no file with a supported extension ({', '.join(SUPPORTED_EXTENSIONS)})",
            file=sys.stderr,
        )
        return 1
    documents = chunks = unchanged = failed = 0
    started = time.monotonic()
    with (
        admin_client() as client,
        tqdm(
            total=sum(f.stat().st_size for f, _ in files),
            unit="B",
            unit_scale=True,
            desc=args.collection,
            file=sys.stderr,
        ) as bar,
    ):
        for path, source in files:
            response = _upload(client, args.collection, path, source, args.volatile)
            bar.update(path.stat().st_size)
            if response.status_code >= 400:
                failed += 1
                bar.write(f"{source}: {error_message(response)}")
                continue
            result = response.json()
            documents += result["documents"]
            chunks += result["chunks"]
            unchanged += result["unchanged"]
    seconds = time.monotonic() - started
    print(
        f"{args.collection}: {documents} documents, {chunks} chunks ({unchanged} documents unchanged) "
        f"in {seconds:.1f} s" + (f"; {failed} files failed" if failed else "")
    )
    return 1 if failed else 0


def _upload(
    client: httpx.Client, collection: str, path: Path, source: str, volatile: bool | None
) -> httpx.Response:
    content_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    data = {} if volatile is None else {"volatile": str(volatile).lower()}
    with path.open("rb") as handle:
        return client.post(
            f"/admin/collections/{quote(collection, safe='')}/documents",
            files={"file": (source, handle, content_type)},
            data=data,
        )


def _list(args: argparse.Namespace) -> int:
    with admin_client() as client:
        return report(client.get("/admin/collections"))


def _remove(args: argparse.Namespace) -> int:
    name = quote(args.name, safe="")
    path = f"/admin/collections/{name}"
    if args.source:
        path += f"/documents/{quote(args.source, safe='/')}"
    with admin_client() as client:
        return report(client.delete(path))
