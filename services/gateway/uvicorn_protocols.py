"""uvicorn's connection protocols, with the two controls a public gateway needs that uvicorn lacks.

* `HandshakeDeadlineHttpToolsProtocol` (`...H11Protocol` without httptools): a connection must
  finish sending its request head (the WebSocket handshake, or any HTTP request) within
  `handshake_timeout` seconds of connecting, or it is dropped. uvicorn waits forever for a half-sent request head, so 50 slow-loris
  sockets stayed open indefinitely.
* `AbortableWebSocketProtocol`: offers the ASGI app `scope["extensions"]["portico.abort"]`, a
  callable that drops the TCP connection at once. A peer that stops reading fills its send
  buffer; uvicorn's `send` (and so a close frame) then waits forever for it to drain, and the
  socket stays open with megabytes buffered. The gateway aborts such a socket instead.

Both are set on the uvicorn `Config` by `services.gateway.main.uvicorn_config`; the raw
transport's `WebSocketLink.abort` calls the second.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    HTTPTOOLS = True
except ImportError:  # httptools not installed: h11 only
    HTTPTOOLS = False
    HttpToolsProtocol = H11Protocol  # type: ignore[misc,assignment]
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

ABORT_EXTENSION = "portico.abort"


class _HandshakeDeadline:
    """Mixed into uvicorn's HTTP protocols: abort a connection whose first request head is not
    complete `handshake_timeout` seconds after it connected."""

    handshake_timeout = 10.0  # replaced per server by `with_handshake_timeout`
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    logger: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(
            self.handshake_timeout, self._on_deadline
        )

    def _head_pending(self) -> bool:
        raise NotImplementedError

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._head_pending() and not self.transport.is_closing():
            self.logger.info(
                "dropped a connection that sent no complete request within %.0fs", self.handshake_timeout
            )
            self.transport.abort()

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._cancel_deadline()  # the transport now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)  # type: ignore[misc]


class HandshakeDeadlineH11Protocol(_HandshakeDeadline, H11Protocol):  # type: ignore[misc]
    def _head_pending(self) -> bool:
        return self.scope is None  # h11 builds the scope once the head is complete


class HandshakeDeadlineHttpToolsProtocol(_HandshakeDeadline, HttpToolsProtocol):  # type: ignore[misc]
    def _head_pending(self) -> bool:
        return self.cycle is None  # httptools starts a cycle once the head is complete


def with_handshake_timeout(seconds: float, *, plain: bool = False) -> type[asyncio.Protocol]:
    """The HTTP protocol class for one server's timeout (uvicorn instantiates the class itself):
    httptools when installed (the parser production uvicorn deployments use), else h11."""
    base: type[_HandshakeDeadline] = (
        HandshakeDeadlineH11Protocol if plain or not HTTPTOOLS else HandshakeDeadlineHttpToolsProtocol
    )
    return type(base.__name__, (base,), {"handshake_timeout": seconds})


class AbortableWebSocketProtocol(WebSocketsSansIOProtocol):
    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if hasattr(self, "scope"):
            self.scope["extensions"][ABORT_EXTENSION] = self.abort  # type: ignore[assignment]

    def abort(self) -> None:
        """Drop the connection now, buffered frames and all (`connection_lost` tells the app)."""
        self.transport.abort()  # idempotent; also drops a write buffer that close() would wait on
