"""One Engine.IO v4 session: its packets, its outgoing queue, its budget, and how it ends.

The endpoint (`engineio.py`) answers HTTP and WebSocket requests and hands each session what
arrives; a session queues what its owner sends and gives it to a poll or writes it to its
WebSocket. Packets: `0` open, `1` close, `2` ping, `3` pong, `4` message, `5` upgrade, `6` noop;
over polling a payload is packets joined by `\\x1e`, a binary message as `b` + base64; over
WebSocket one packet per frame, a binary message as a binary frame.

What a hostile or unlucky client cannot do to a session (and so to the gateway):
* queue without end: outgoing packets are bounded (`max_buffered`); a producer that can wait
  does so once half is queued (`crowded`, `drained`), and a client that stops polling is closed;
* cost without end: every packet it sends spends a token of its budget (`packet_budget`); past
  it the session is closed;
* hold a connection for ever: a write to its WebSocket, or a poll response, that its peer does not
  read within `write_deadline` aborts the connection (the session is gone, its TCP connection
  was not: 2.8 MB stayed queued, outside every gauge, two minutes after its session ended);
* lose the last word: a session closed by its owner (the gateway's `RATE_LIMITED`) still sends
  what was queued before its close, to its WebSocket or in one last poll.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = "0123456"
SEPARATOR = "\x1e"
CLIENT_CLOSED = "client closed"
OUTGOING_FULL = "outgoing buffer full"
PROBE_NOOP_DELAY = 0.1  # a poll during an upgrade ends with a noop after this (as engine.io does)
Message = str | bytes  # a text message, or a binary one
Send = Callable[[dict[str, Any]], Awaitable[None]]  # an ASGI `send`
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    ping_interval: float = 25.0
    ping_timeout: float = 20.0
    max_payload: int = 1_000_000  # bytes of one polling POST, or of one WebSocket frame
    max_buffered: int = 256  # outgoing packets a session may have queued before it is closed
    # An upgrade's WebSocket must reach `5` within this, or it is closed and polling goes on
    # (engine.io's upgradeTimeout): pings pause during an upgrade.
    upgrade_timeout: float = 10.0
    cors_any_origin: bool = False  # `Access-Control-Allow-Origin: *` (the conformance suites)
    # (cookie name, value) set on the polling handshake, for a proxy's affinity (see nginx.conf)
    affinity_cookie: tuple[str, str] | None = None
    # Packets a client may send: `burst` at once, refilled at `per_second` (None: no budget).
    # 32,500 noops in one 64 KiB POST held the event loop 20 ms; two clients doing it in a loop
    # raised a bystander's ping->pong from 1.1 ms to 31.9 ms median.
    packet_budget: tuple[int, float] | None = (200, 100.0)
    max_packets_per_post: int = 100
    write_deadline: float = 10.0  # a peer that takes nothing for this long is aborted
    flush_deadline: float = 5.0  # what is queued at a close goes out within this, or is dropped


class EngineHandler(Protocol):
    """What an Engine.IO session is for (Socket.IO, or the conformance echo)."""

    def on_open(self, session: EngineSession) -> None: ...
    def on_message(self, session: EngineSession, message: Message) -> None: ...
    def on_close(self, session: EngineSession, reason: str) -> None: ...


class ProtocolError(ValueError):
    """A malformed packet: the session is closed."""


def decode_packet(raw: str) -> tuple[str, str]:
    if not raw or raw[0] not in "0123456":
        raise ProtocolError(f"unknown packet type {raw[:1]!r}")
    return raw[0], raw[1:]


def encode_message(message: Message, *, binary_as_base64: bool) -> str | bytes:
    if isinstance(message, bytes):
        return "b" + base64.b64encode(message).decode() if binary_as_base64 else message
    return MESSAGE + message


async def write_or_abort(
    send: Send, message: dict[str, Any], deadline: float, abort: Callable[[], None] | None
) -> None:
    """One ASGI send that the peer must take within `deadline`; else the connection is aborted
    (uvicorn's send waits for ever on a peer that does not read) and TimeoutError raised."""
    try:
        async with asyncio.timeout(deadline):
            await send(message)
    except TimeoutError:
        if abort is not None:
            abort()
        raise


class EngineSession:
    """One Engine.IO client, on whichever transport it uses now."""

    __slots__ = (
        "_drained",
        "_final_poll",
        "_flusher",
        "_handler",
        "_outgoing",
        "_poll_waiter",
        "_tokens",
        "_tokens_at",
        "_ws_closing",
        "abort",
        "closed",
        "closing",
        "config",
        "data",
        "forget",
        "next_ping",
        "polling",
        "pong_deadline",
        "probed",
        "scope",
        "sid",
        "upgraded_at",
        "upgrading",
        "ws",
    )

    def __init__(
        self,
        sid: str,
        scope: dict[str, Any],
        config: EngineConfig,
        handler: EngineHandler,
        forget: Callable[[EngineSession], None],
        ws: Send | None,
        abort: Callable[[], None] | None = None,
    ) -> None:
        self.sid = sid
        self.scope = scope  # what the handshake told: headers the owner needs, scheme
        self.config = config
        self._handler = handler
        self.forget = forget  # takes it out of the endpoint's sessions
        self.ws = ws  # the ASGI websocket `send` while on WebSocket
        self.abort = abort  # drops the WebSocket's TCP connection at once (when the server offers it)
        self.polling = ws is None
        self.upgrading = False
        self.probed = False  # the upgrade probe was answered: polls now end with a noop
        self.upgraded_at = 0.0
        self.closed = False
        self.closing = False  # the client sent `1` over polling with no poll waiting
        self.data: Any = None  # the handler's state for this session
        self._outgoing: deque[str | bytes] = deque()
        self._poll_waiter: asyncio.Future[None] | None = None
        self._final_poll = False  # closed, with packets that one last poll takes
        self._flusher: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # a producer waiting (`drained`)
        self._ws_closing: asyncio.Task[None] | None = None  # the WebSocket's flush and close
        self.next_ping = time.monotonic() + config.ping_interval
        self.pong_deadline: float | None = None
        budget = config.packet_budget
        self._tokens = float(budget[0]) if budget else 0.0
        self._tokens_at = time.monotonic()

    @property
    def transport(self) -> str:
        return "polling" if self.polling else "websocket"

    # -- what the owner sends --------------------------------------------------------------

    def send(self, message: Message) -> None:
        """Queue a message packet (text or binary) for the client."""
        if not self.closed:
            self.push(encode_message(message, binary_as_base64=self.polling))

    def push(self, packet: str | bytes) -> None:
        if len(self._outgoing) >= self.config.max_buffered:
            self.close(OUTGOING_FULL + " (the client does not read)")
            return
        self._outgoing.append(packet)
        if self.polling:
            self._wake_poll()
        elif self._flusher is None and self.ws is not None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush(self.ws))

    def crowded(self) -> bool:
        """Half the outgoing bound is queued: a producer that can wait should (`drained`)."""
        return len(self._outgoing) * 2 >= self.config.max_buffered

    async def drained(self) -> None:
        """Return once everything queued has been taken (by a poll, or written to the
        WebSocket), or the session has closed."""
        while self._outgoing and not self.closed:
            if self._drained is None or self._drained.done():
                self._drained = asyncio.get_running_loop().create_future()
            await self._drained

    def _wake_drained(self) -> None:
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)
        self._drained = None

    def _wake_poll(self) -> None:
        if self._poll_waiter is not None and not self._poll_waiter.done():
            self._poll_waiter.set_result(None)

    async def _flush(self, send: Send) -> None:
        try:
            while self._outgoing:
                packet = self._outgoing.popleft()
                frame = {"type": "websocket.send", "bytes": packet} if isinstance(packet, bytes) else None
                await write_or_abort(
                    send,
                    frame or {"type": "websocket.send", "text": packet},
                    self.config.write_deadline,
                    self.abort,
                )
        except Exception as exc:  # the peer went away mid-write, or took nothing in time (aborted)
            self._outgoing.clear()
            self.close(f"write failed ({exc.__class__.__name__})")
        finally:
            self._flusher = None
            if not self._outgoing:
                self._wake_drained()

    # -- how it ends -----------------------------------------------------------------------

    def close(self, reason: str, *, flush: bool = False) -> None:
        """End the session (idempotent). `flush`: what is queued still goes out first (within
        `flush_deadline`): to the WebSocket, then its close; over polling in a last poll, which
        also carries the close packet. Otherwise a waiting poll gets `1` (or a noop, when the
        client asked to close) and a WebSocket is closed at once."""
        if self.closed:
            return
        self.closed = True
        self._wake_drained()
        loop = asyncio.get_running_loop()
        if self.polling:
            if not flush:
                self._outgoing.clear()
            self._outgoing.append(NOOP if reason == CLIENT_CLOSED else CLOSE)
            if self._poll_waiter is not None and not self._poll_waiter.done():
                self._poll_waiter.set_result(None)
                self.forget(self)
            elif flush and len(self._outgoing) > 1:
                # Kept for its last poll (the client's next request), or until the deadline.
                self._final_poll = True
                loop.call_later(self.config.flush_deadline, self._forget_final)
            else:
                self.forget(self)
        else:
            self.forget(self)
            send, self.ws = self.ws, None
            if not flush:
                self._outgoing.clear()
                if self._flusher is not None:
                    self._flusher.cancel()
            if send is not None:
                self._ws_closing = loop.create_task(self._close_websocket(send, self._flusher))
        try:
            self._handler.on_close(self, reason)
        except Exception:
            log.exception("engine.io: close handler failed")

    def _forget_final(self) -> None:
        if self._final_poll:
            self._final_poll = False
            self._outgoing.clear()
            self.forget(self)

    def take_final_poll(self) -> str | None:
        """The last poll of a session closed with `flush`: its payload (it ends with `1`)."""
        if not self._final_poll:
            return None
        self._final_poll = False
        self.forget(self)
        return self.take_payload()

    async def websocket_closed(self) -> None:
        """Return once a WebSocket closed by the server has sent what was queued and its close
        (bounded by the deadlines): its ASGI handler must not end before, or the server drops
        the connection under the last packets."""
        if self._ws_closing is not None:
            await asyncio.wait([self._ws_closing])

    async def _close_websocket(self, send: Send, flusher: asyncio.Task[None] | None) -> None:
        try:
            async with asyncio.timeout(self.config.flush_deadline):
                if flusher is not None:
                    await asyncio.wait([flusher])
            await write_or_abort(
                send, {"type": "websocket.close", "code": 1000}, self.config.write_deadline, self.abort
            )
        except Exception:  # gone already, or aborted for taking nothing
            if self.abort is not None:
                self.abort()

    # -- what the client sends -------------------------------------------------------------

    def spend(self, packets: int = 1) -> bool:
        """Take `packets` tokens of the client's packet budget; False when it is spent."""
        budget = self.config.packet_budget
        if budget is None:
            return True
        now = time.monotonic()
        self._tokens = min(float(budget[0]), self._tokens + (now - self._tokens_at) * budget[1])
        self._tokens_at = now
        if self._tokens < packets:
            return False
        self._tokens -= packets
        return True

    def receive(self, packet_type: str, data: str | bytes) -> None:
        if self.closing:
            return  # nothing after the client's own close
        if packet_type == MESSAGE:
            self._handler.on_message(self, data)
        elif packet_type == PONG:
            self.pong_deadline = None
        elif packet_type == CLOSE:
            if self.polling and (self._poll_waiter is None or self._poll_waiter.done()):
                # The client's poll may still be on its way (it travels on another connection):
                # it ends with a noop, and the session then, or after a moment without it.
                self.closing = True
                asyncio.get_running_loop().call_later(PROBE_NOOP_DELAY, self.close, CLIENT_CLOSED)
            else:
                self.close(CLIENT_CLOSED)
        elif packet_type == OPEN:
            raise ProtocolError("open packet from a client")
        # PING (outside the probe: v3 clients), UPGRADE and NOOP need nothing here

    # -- polling ---------------------------------------------------------------------------

    def has_outgoing(self) -> bool:
        return bool(self._outgoing)

    def poll_waiting(self) -> bool:
        return self._poll_waiter is not None and not self._poll_waiter.done()

    async def wait_for_outgoing(self, disconnected: asyncio.Future[None]) -> bool:
        """A poll with nothing to take waits for a packet; False when the client went away."""
        waiter = self._poll_waiter = asyncio.get_running_loop().create_future()
        try:
            await asyncio.wait([waiter, disconnected], return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._poll_waiter = None
        return waiter.done()

    def end_waiting_poll(self) -> None:
        if self.polling and not self.closed and self.poll_waiting():
            self.push(NOOP)

    def take_payload(self) -> str:
        packets = []
        while self._outgoing:
            packet = self._outgoing.popleft()
            packets.append(packet if isinstance(packet, str) else "b" + base64.b64encode(packet).decode())
        self._wake_drained()
        return SEPARATOR.join(packets)

    # -- the upgrade -----------------------------------------------------------------------

    async def upgrade_settled(self) -> None:
        """Wait until PROBE_NOOP_DELAY after the upgrade: a poll refused for it is answered then,
        so that the client has the upgrade's own replies (`3probe`) first."""
        await asyncio.sleep(max(0.0, self.upgraded_at + PROBE_NOOP_DELAY - time.monotonic()))

    def take_over(self, send: Send, abort: Callable[[], None] | None) -> None:
        """The upgrade completed: from now on the WebSocket carries everything."""
        pending = [p for p in self._outgoing if p != NOOP]
        self._outgoing.clear()
        self.polling = False
        self.upgraded_at = time.monotonic()
        self.ws, self.abort = send, abort
        self._wake_poll()
        for packet in pending:
            self.push(
                base64.b64decode(packet[1:]) if isinstance(packet, str) and packet[:1] == "b" else packet
            )
