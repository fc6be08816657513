"""uvicorn's connection protocols, with the controls a public gateway needs that uvicorn lacks.

* `RequestDeadlineHttpToolsProtocol` (`...H11Protocol` without httptools): every request on a
  connection (the WebSocket handshake, an Engine.IO poll or post, any HTTP request) must arrive
  whole, head and body, within `request_timeout` seconds of its first byte (of the connection,
  for the first one), or the connection is dropped. uvicorn waits for ever for a half-sent
  request: 50 slow-loris sockets stayed open indefinitely; and after the first request only
  idle keep-alive connections were timed out, so a stalled second head, or a POST that
  announced 60,000 bytes and sent one, was still open after 70 s.
* A request head over `MAX_HEAD_BYTES` (64 KiB) is answered 431 and its connection closed:
  there was no limit, and 25 handshakes with a 4 MB header added 76 MiB.
* The HTTP protocols offer the ASGI app `scope["extensions"]["portico.abort"]`, a callable
  that drops the TCP connection at once, and `AbortableWebSocketProtocol` the same as its
  `abort` (with `write_now`, a frame written without an await: `scope["extensions"]
  ["portico.websocket"]` is the protocol itself). A
  peer that stops reading fills its send buffer; uvicorn's `send` (and so a close frame, or
  the rest of a poll's response) then waits for ever for it to drain, and the connection stays
  open with megabytes buffered. The gateway aborts it instead.

All are set on the uvicorn `Config` by `services.gateway.main.uvicorn_config`; the raw
transport's `WebSocketLink.abort` and the Engine.IO endpoint call the abort.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    HTTPTOOLS = True
except ImportError:  # httptools not installed: h11 only
    HTTPTOOLS = False
    HttpToolsProtocol = H11Protocol  # type: ignore[misc,assignment]
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

ABORT_EXTENSION = "portico.abort"  # HTTP connections: a callable that drops the connection
PROTOCOL_EXTENSION = "portico.websocket"  # WebSocket connections: the protocol (`AbortableWebSocketProtocol`)
MAX_HEAD_BYTES = 64 * 1024
_TOO_LARGE = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: 29\r\nconnection: close\r\n\r\nRequest head is over 64 KiB\r\n"
)


class _RequestDeadline:
    """Mixed into uvicorn's HTTP protocols: a request must arrive whole within `request_timeout`
    of its first byte; its head may hold at most MAX_HEAD_BYTES."""

    request_timeout = 10.0  # replaced per server by `with_request_timeout`
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    logger: Any
    scope: Any

    def connection_made(self, transport: asyncio.Transport) -> None:
        self._deadline: asyncio.TimerHandle | None = None
        self._rejected = False
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()  # the first request is due now: a connection that sends nothing is dropped too

    def _receiving(self) -> bool:
        """A request has begun arriving (or is due: the connection's first) and is not whole."""
        raise NotImplementedError

    def _arm(self) -> None:
        if self._deadline is None:
            self._deadline = self.loop.call_later(self.request_timeout, self._on_deadline)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _on_deadline(self) -> None:
        self._deadline = None
        if self._receiving() and not self.transport.is_closing():
            self.logger.info(
                "dropped a connection whose request did not arrive within %.0fs", self.request_timeout
            )
            self.transport.abort()

    def _reject_head(self) -> None:
        """A head over MAX_HEAD_BYTES: 431, and the connection closed."""
        if not self._rejected:
            self._rejected = True
            self._disarm()
            self.logger.info("refused a request head over %d bytes", MAX_HEAD_BYTES)
            self.transport.write(_TOO_LARGE)
            self.transport.close()

    def _offer_abort(self) -> None:
        if isinstance(getattr(self, "scope", None), dict):
            self.scope.setdefault("extensions", {})[ABORT_EXTENSION] = self.transport.abort

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._disarm()  # the transport now belongs to the WebSocket protocol
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


class RequestDeadlineH11Protocol(_RequestDeadline, H11Protocol):
    """h11 bounds the head itself (`h11_max_incomplete_event_size`, set by `uvicorn_config`)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._requests_seen = False
        super().connection_made(transport)  # type: ignore[arg-type]

    def _receiving(self) -> bool:
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            return True
        return state is h11.IDLE and (not self._requests_seen or bool(self.conn.trailing_data[0]))

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._requests_seen = True
        self._offer_abort()
        if self._receiving():
            self._arm()
        else:
            self._disarm()


class RequestDeadlineHttpToolsProtocol(_RequestDeadline, HttpToolsProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._in_request = True  # the first one is due
        self._head_done = False
        self._head_raw = 0  # bytes received while the head was incomplete
        self._head_parsed = 0  # bytes of the head's URL and headers, as parsed
        super().connection_made(transport)  # type: ignore[arg-type]

    def _receiving(self) -> bool:
        return self._in_request

    def data_received(self, data: bytes) -> None:
        if self._rejected:
            return
        super().data_received(data)
        if self._in_request and not self._head_done:
            # Everything of this chunk belonged to the head (it is still incomplete).
            self._head_raw += len(data)
            if self._head_raw > MAX_HEAD_BYTES:
                self._reject_head()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_request, self._head_done = True, False
        self._head_raw = self._head_parsed = 0
        self._offer_abort()
        self._arm()

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        super().on_header(name, value)
        self._count_head(len(name) + len(value) + 4)

    def _count_head(self, size: int) -> None:
        # A head that arrives whole in one chunk is counted here, header by header.
        self._head_parsed += size
        if self._head_parsed > MAX_HEAD_BYTES:
            self._reject_head()

    def on_headers_complete(self) -> None:
        if self._rejected:
            return
        self._head_done = True
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._rejected:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._rejected:
            return
        super().on_message_complete()
        self._in_request = False
        self._disarm()


def abort_of(scope: Any) -> Any:
    """The callable that drops a request's or a WebSocket's connection at once (None outside
    these protocols, e.g. under a test client)."""
    extensions = scope.get("extensions", {})
    protocol = extensions.get(PROTOCOL_EXTENSION)
    return protocol.abort if protocol is not None else extensions.get(ABORT_EXTENSION)


def with_request_timeout(seconds: float, *, plain: bool = False) -> type[asyncio.Protocol]:
    """The HTTP protocol class for one server's timeout (uvicorn instantiates the class itself):
    httptools when installed (the parser production uvicorn deployments use), else h11."""
    base: type[_RequestDeadline] = (
        RequestDeadlineH11Protocol if plain or not HTTPTOOLS else RequestDeadlineHttpToolsProtocol
    )
    return type(base.__name__, (base,), {"request_timeout": seconds})


class AbortableWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, offered to the app itself (`PROTOCOL_EXTENSION`, the
    protocol object: no object more per connection) for two things ASGI lacks: `abort`, and
    `write_now`, a text frame written without an await."""

    def handle_connect(self, event: Any) -> None:
        super().handle_connect(event)
        if hasattr(self, "scope"):
            self.scope["extensions"][PROTOCOL_EXTENSION] = self  # type: ignore[assignment]

    def abort(self) -> None:
        """Drop the connection now, buffered frames and all (`connection_lost` tells the app)."""
        self.transport.abort()  # idempotent; also drops a write buffer that close() would wait on

    def write_now(self, text: str) -> bool:
        """Write a text frame at once if the connection takes it without waiting (accepted, not
        closing, its send buffer under the high-water mark), as `send` does for
        `websocket.send`; else False, nothing written. A push through `send` cost a task and an
        ASGI round: a gateway spent 140 µs of CPU per push where the bare relay, writing in a
        loop, spent 37."""
        if (
            not self.handshake_complete
            or self.close_sent
            or self.disconnected
            or not self.writable.is_set()
            or self.transport.is_closing()
        ):
            return False
        self.conn.send_text(text.encode())
        self.transport.write(b"".join(self.conn.data_to_send()))
        return True
