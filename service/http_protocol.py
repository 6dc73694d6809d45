"""The HTTP/1.1 protocol ``serve`` runs: uvicorn's httptools protocol with two changes.

- Malformed HTTP (a garbage request line, a NUL or a bare newline in a header) is answered in
  OpenAI's envelope rather than uvicorn's ``text/plain`` 400: clients parse one error shape.
- The request head is bounded while it arrives. httptools buffers a header until it ends,
  with no limit, so a 1 MB header would reach the app whole (and a hundred such connections a
  hundred MB). The head's bytes are counted as they are received; past the bound, the client
  gets a 431 and the connection is closed, so a head costs at most the bound plus one read.
  :class:`~service.middleware.HeaderLimits` then makes the exact check (header count, bytes of
  names and values) on every head that gets through.

It subclasses uvicorn's internals, which is why ``pyproject.toml`` bounds uvicorn's version.
"""

from __future__ import annotations

import asyncio
from typing import Any, ClassVar

from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.server import ServerState

from service.errors import APIError, HeadersTooLargeError, InvalidRequestError

HEAD_ALLOWANCE = 16 * 1024
"""Room on top of ``max_header_bytes`` for the request line and the ``: `` and CRLF framing:
this coarse count of wire bytes must never refuse a head that the exact check accepts."""


class GatewayHttpProtocol(HttpToolsProtocol):
    """Use :func:`gateway_protocol` to get one bound to the settings."""

    max_head_bytes: ClassVar[int] = 32 * 1024 + HEAD_ALLOWANCE

    def __init__(
        self,
        config: Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        # Bytes of the head being read; None while a body arrives (a body has its own limit).
        self._head_bytes: int | None = 0

    def data_received(self, data: bytes) -> None:
        if self._head_bytes is not None:
            self._head_bytes += len(data)
        super().data_received(data)
        if self.transport.is_closing():  # refused as malformed
            return
        # Checked after parsing: a head that ended within this read is complete (HeaderLimits
        # judges it), and whatever followed it was body, not head.
        if self._head_bytes is not None and self._head_bytes > self.max_head_bytes:
            self._head_bytes = None
            self.logger.warning("Request head over %s bytes: refused.", self.max_head_bytes)
            self._refuse(
                HeadersTooLargeError(
                    f"The request line and headers exceed {self.max_head_bytes} bytes "
                    f"(HYBRID_MAX_HEADER_BYTES plus {HEAD_ALLOWANCE} for the request line)."
                )
            )

    def on_headers_complete(self) -> None:
        self._head_bytes = None
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._head_bytes = 0  # a keep-alive connection's next request starts with its head
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        self._refuse(
            InvalidRequestError(
                f"{msg} The request line or a header is malformed (a control character such as "
                "NUL in a header is refused).",
                code="invalid_http_request",
            )
        )

    def _refuse(self, error: APIError) -> None:
        """Answer ``error`` and close the connection, as uvicorn's own 400 does."""
        if self.transport.is_closing():
            return
        # A response already under way cannot be followed by another on the same connection.
        if self.cycle is None or not self.cycle.response_started or self.cycle.response_complete:
            body = error.body()
            head = [STATUS_LINE[error.status_code]]
            head += [name + b": " + value + b"\r\n" for name, value in self.server_state.default_headers]
            head += [
                b"content-type: application/json\r\n",
                b"content-length: " + str(len(body)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
            ]
            self.transport.write(b"".join(head) + body)
        self.transport.close()


def gateway_protocol(max_header_bytes: int) -> type[GatewayHttpProtocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, its head bound set from
    ``HYBRID_MAX_HEADER_BYTES``."""

    class BoundedGatewayHttpProtocol(GatewayHttpProtocol):
        max_head_bytes = max_header_bytes + HEAD_ALLOWANCE

    return BoundedGatewayHttpProtocol
