"""The drain's decisions, on uvicorn's tick: when the gateway stops, and what it logs."""

from __future__ import annotations

import logging
import signal

import pytest
import uvicorn

from service.admission import Admission
from service.server import DrainingServer


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("never called")


@pytest.fixture
def admission() -> Admission:
    return Admission(8, retry_after_s=5)


def _server(admission: Admission, drain_timeout_s: float = 60) -> DrainingServer:
    return DrainingServer(uvicorn.Config(_app, log_config=None), admission, drain_timeout_s)


async def test_sigterm_drains_until_nothing_is_in_flight(
    admission: Admission, caplog: pytest.LogCaptureFixture
) -> None:
    server = _server(admission)
    admission.in_flight = 2
    with caplog.at_level(logging.INFO, logger="service.server"):
        server.handle_exit(signal.SIGTERM, None)
        # The signal handler only sets flags: logging there can fail on a stream it interrupted.
        assert admission.draining
        assert caplog.records == []
        assert not await server.on_tick(1)
        assert not await server.on_tick(2)
        [announced] = caplog.records
        assert announced.getMessage() == "draining: new requests get 503; 2 in flight may take up to 60 s"
        admission.in_flight = 0
        assert await server.on_tick(3)


async def test_the_drain_period_bounds_the_wait(admission: Admission) -> None:
    server = _server(admission, drain_timeout_s=0)
    admission.in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert await server.on_tick(1)


async def test_a_second_signal_stops_at_once(admission: Admission) -> None:
    server = _server(admission)
    admission.in_flight = 1
    server.handle_exit(signal.SIGTERM, None)
    assert not await server.on_tick(1)
    server.handle_exit(signal.SIGTERM, None)
    assert await server.on_tick(2)
