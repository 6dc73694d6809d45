"""The HTTP server: uvicorn, with a drain on SIGTERM.

uvicorn alone closes its listening socket as soon as it is asked to stop, so a request arriving
during a rolling update gets "connection refused" from this instance. Here the first SIGTERM
(or Ctrl-C) only starts draining: the gateway keeps accepting connections, answers new requests
with 503 + Retry-After (and /ready with 503, so load balancers take it out), lets the requests
in flight finish for up to ``HYBRID_DRAIN_TIMEOUT_S``, then stops as uvicorn does (lifespan
shutdown: the local engine goes down with it). A second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn

from service.admission import Admission

logger = logging.getLogger(__name__)

LAST_CALL_S = 1
"""What uvicorn still grants to connections once the drain is over (idle keep-alives close)."""


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission, drain_timeout_s: float) -> None:
        super().__init__(config)
        self._admission = admission
        self._drain_timeout_s = drain_timeout_s
        self._drain_announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # A signal handler: only flags are set here, and nothing is logged (a handler writing to
        # the stream the interrupted code was writing fails with "reentrant call"); on_tick does
        # the rest on the event loop.
        if self._admission.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            super().handle_exit(sig, frame)
            return
        self._captured_signals.append(sig)  # uvicorn re-raises it once stopped, as it would have
        self._admission.start_draining()

    async def on_tick(self, counter: int) -> bool:
        since = self._admission.draining_since
        if since is not None and not self._drain_announced:
            self._drain_announced = True
            logger.info(
                "draining: new requests get 503; %d in flight may take up to %.0f s",
                self._admission.in_flight,
                self._drain_timeout_s,
            )
        if since is not None and not self.should_exit:
            overdue = time.monotonic() - since >= self._drain_timeout_s
            if self._admission.in_flight == 0 or overdue:
                if overdue:
                    logger.warning(
                        "drain period over with %d requests in flight; stopping them",
                        self._admission.in_flight,
                    )
                self.should_exit = True
        return await super().on_tick(counter)


def serve(config: uvicorn.Config, admission: Admission, drain_timeout_s: float) -> None:
    """Run the server until it has drained (blocking)."""
    config.timeout_graceful_shutdown = LAST_CALL_S
    DrainingServer(config, admission, drain_timeout_s).run()
