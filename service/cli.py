"""``hybrid-serve``: the command line. ``serve`` runs the gateway; ``model`` materialises the
bundled model and the embedder's ONNX export; ``adapters``, ``ingest`` and ``collections`` drive
the admin API."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from adapters.extras import MissingExtraError
from service import cli_adapters, cli_collections, cli_router, cli_traffic
from service.settings import Settings, load_settings


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hybrid-serve",
        description="OpenAI-compatible chat over vLLM with LoRA adapters and retrieval. "
        "Settings come from HYBRID_* environment variables (see the README).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve", help="run the gateway (and a local engine unless HYBRID_ENGINE_URL is set)"
    )
    serve.add_argument("--host", help="listen address (HYBRID_HOST)")
    serve.add_argument("--port", type=int, help="listen port (HYBRID_PORT)")
    serve.set_defaults(handler=_serve)

    model = commands.add_parser(
        "model",
        help="build the bundled model and the embedder's ONNX export once (verified by checksum) "
        "and print the model's directory",
    )
    model.add_argument("--cache-dir", help="where to build it (HYBRID_CACHE_DIR)")
    model.set_defaults(handler=_model)

    cli_adapters.add_parser(commands)
    cli_collections.add_parsers(commands)
    cli_router.add_parser(commands)
    cli_traffic.add_parser(commands)

    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
    except MissingExtraError as error:
        # A command whose extra is not installed: the message names the extra; a traceback adds nothing.
        print(f"hybrid-serve {args.command}: {error}", file=sys.stderr)
        return 2
    return code


def _settings(**overrides: object) -> Settings:
    return load_settings(**overrides)


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from service.app import build_app
    from service.http_protocol import gateway_protocol
    from service.launcher import model_dirs_problem
    from service.server import serve

    settings = _settings(host=args.host, port=args.port)
    problem = settings.exposure_problem or model_dirs_problem(settings)
    if problem is not None:
        print(f"hybrid-serve serve: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app = build_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level.lower(),
        access_log=False,
        http=gateway_protocol(settings.max_header_bytes),
    )
    serve(config, app.state.admission, settings.drain_timeout_s)
    return 0


def _model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from service.bundled_model import ensure_bundled_model

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    settings = _settings(cache_dir=Path(args.cache_dir) if args.cache_dir else None)
    bundled = ensure_bundled_model(settings.cache_dir)
    if settings.embedder_backend == "onnx":
        _embedder_export(settings)
    print(bundled.path)  # stdout is the model directory alone; the rest is logged
    return 0


def _embedder_export(settings: Settings) -> None:
    """The embedder's ONNX export, made here so that serving never waits for it."""
    from index.embedder import bundled_embedder_path
    from index.onnx_embedder import ensure_onnx_model
    from index.st_layout import UnsupportedModelError

    log = logging.getLogger("hybrid-serve.model")
    source = settings.embedder_dir or bundled_embedder_path()
    try:
        log.info("embedder ONNX export at %s", ensure_onnx_model(source, settings.cache_dir))
    except UnsupportedModelError as error:
        log.warning("%s; the embedder will run on torch", error)


if __name__ == "__main__":
    sys.exit(main())
