"""A stand-in for the engine *process*, for the supervisor's process-handling tests only.

Standard library only. It answers ``GET /v1/models`` like vLLM once "ready" (503 before), and
can misbehave on demand: exit at once (after starting its grandchild when both are asked),
keep a grandchild in its process group, or ignore SIGTERM. The real engine is exercised by the e2e tier.

    python tests/fake_engine_server.py --port 9123 [--delay-ready 0.5] [--exit-immediately 3]
        [--spawn-child --child-pid-file PATH] [--ignore-sigterm]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

_MODELS = {
    "object": "list",
    "data": [{"id": "fake", "object": "model", "created": 0, "owned_by": "test", "parent": None}],
}


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--delay-ready", type=float, default=0.0, metavar="SECONDS")
    parser.add_argument("--exit-immediately", type=int, default=None, metavar="CODE")
    parser.add_argument("--spawn-child", action="store_true")
    parser.add_argument("--child-pid-file", type=Path, default=None)
    parser.add_argument("--ignore-sigterm", action="store_true")
    args = parser.parse_args(argv)
    if args.spawn_child and args.child_pid_file is None:
        parser.error("--spawn-child needs --child-pid-file")
    return args


def _handler(ready_at: float) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/v1/models":
                self._send(404, {"error": {"message": "not found", "type": "not_found"}})
            elif time.monotonic() < ready_at:
                self._send(503, {"error": {"message": "starting", "type": "unavailable"}})
            else:
                self._send(200, _MODELS)

        def _send(self, status: int, body: object) -> None:
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: object) -> None:
            print(f"fake-engine: {format % args}", flush=True)

    return Handler


def main(argv: list[str]) -> int:
    args = _parse(argv)
    print(f"fake-engine: pid {os.getpid()} argv {argv}", flush=True)
    if args.spawn_child:
        # Same process group as this one (no new session): stands for vLLM's forked workers.
        child = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL)
        scratch = args.child_pid_file.with_name(args.child_pid_file.name + ".tmp")
        scratch.write_text(str(child.pid))
        os.replace(scratch, args.child_pid_file)  # readers never see a half-written pid
    if args.exit_immediately is not None:
        # After --spawn-child when both are given: a server that crashes once its workers run.
        return int(args.exit_immediately)
    if args.ignore_sigterm:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    ready_at = time.monotonic() + args.delay_ready
    server = ThreadingHTTPServer((args.host, args.port), _handler(ready_at))
    print(f"fake-engine: listening on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
