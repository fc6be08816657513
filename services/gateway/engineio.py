"""Engine.IO v4, server side: sessions over HTTP long-polling and WebSocket, and the upgrade.

What Socket.IO (`socketio.py`) runs on. An `EngineServer` is an ASGI handler for one path
(`/socket.io/`): it answers the handshake (`0{"sid",...}`), keeps each session's outgoing
packets, hands incoming messages to its owner (`EngineHandler`), and closes a session that is
malformed, too large, silent past `ping_interval + ping_timeout`, or polled twice at once.
Every malformed input closes only its own session.

* Packets: `0` open, `1` close, `2` ping, `3` pong, `4` message, `5` upgrade, `6` noop. Over
  polling a payload is packets joined by `\\x1e`, a binary message as `b` + base64; over
  WebSocket one packet per frame, a binary message as a binary frame.
* Heartbeat: the server pings every `ping_interval` and expects a pong within `ping_timeout`.
  One timer task for all sessions (`run_heartbeat`), not a task per session.
* Upgrade: a WebSocket with the session's `sid` answers `2probe` with `3probe`, ends a waiting
  poll with `6` 100 ms later, and takes over at `5`; from then on polling requests for the sid
  (a poll still waiting included) get 400 and a second WebSocket for it is closed.
* Outgoing packets are queued per session and bounded (`max_buffered`): a polling client that
  stops polling is closed, not buffered for without end. A producer that can wait does so
  once half the bound is queued (`crowded`, `drained`): the gateway's carts then wait in its
  outbox, where a newer cart replaces a queued one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qs

log = logging.getLogger(__name__)

OPEN, CLOSE, PING, PONG, MESSAGE, UPGRADE, NOOP = "0123456"
SEPARATOR = "\x1e"
CLIENT_CLOSED = "client closed"
OUTGOING_FULL = "outgoing buffer full"
PROBE_NOOP_DELAY = 0.1  # a poll during an upgrade ends with a noop after this (as engine.io does)
Message = str | bytes  # a text message, or a binary one


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


class EngineSession:
    """One Engine.IO client, on whichever transport it uses now."""

    __slots__ = (
        "_drained",
        "_flusher",
        "_outgoing",
        "_poll_waiter",
        "_server",
        "closed",
        "closing",
        "data",
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

    def __init__(self, server: EngineServer, sid: str, scope: Any, ws: Any | None) -> None:
        self._server = server
        self.sid = sid
        self.scope = scope  # the handshake request: headers, cookies, origin
        self.ws = ws  # the ASGI websocket `send` while on WebSocket
        self.polling = ws is None
        self.upgrading = False
        self.probed = False  # the upgrade probe was answered: polls now end with a noop
        self.upgraded_at = 0.0
        self.closed = False
        self.closing = False  # the client sent `1` over polling with no poll waiting
        self.data: Any = None  # the handler's state for this session
        self._outgoing: deque[str | bytes] = deque()
        self._poll_waiter: asyncio.Future[None] | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._drained: asyncio.Future[None] | None = None  # a producer waiting (`drained`)
        self.next_ping = time.monotonic() + server.config.ping_interval
        self.pong_deadline: float | None = None

    @property
    def transport(self) -> str:
        return "polling" if self.polling else "websocket"

    def send(self, message: Message) -> None:
        """Queue a message packet (text or binary) for the client."""
        if not self.closed:
            self._push(encode_message(message, binary_as_base64=self.polling))

    def _push(self, packet: str | bytes) -> None:
        if len(self._outgoing) >= self._server.config.max_buffered:
            self.close(OUTGOING_FULL + " (the client does not read)")
            return
        self._outgoing.append(packet)
        if self.polling:
            if self._poll_waiter is not None and not self._poll_waiter.done():
                self._poll_waiter.set_result(None)
        elif self._flusher is None:
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def upgrade_settled(self) -> None:
        """Wait until PROBE_NOOP_DELAY after the upgrade: a poll refused for it is answered then,
        so that the client has the upgrade's own replies (`3probe`) first."""
        await asyncio.sleep(max(0.0, self.upgraded_at + PROBE_NOOP_DELAY - time.monotonic()))

    def crowded(self) -> bool:
        """Half the outgoing bound is queued: a producer that can wait should (`drained`)."""
        return len(self._outgoing) * 2 >= self._server.config.max_buffered

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

    async def _flush(self) -> None:
        try:
            while self._outgoing and self.ws is not None:
                packet = self._outgoing.popleft()
                if isinstance(packet, bytes):
                    await self.ws({"type": "websocket.send", "bytes": packet})
                else:
                    await self.ws({"type": "websocket.send", "text": packet})
        except Exception as exc:  # the peer went away mid-write
            self.close(f"write failed ({exc.__class__.__name__})")
        finally:
            self._flusher = None
            if not self._outgoing:
                self._wake_drained()

    def close(self, reason: str) -> None:
        """End the session (idempotent): a waiting poll gets `1`, a WebSocket is closed."""
        if self.closed:
            return
        self.closed = True
        self._server.forget(self)
        self._wake_drained()
        if self._poll_waiter is not None and not self._poll_waiter.done():
            self._outgoing.clear()
            # The client asked to close: its waiting poll just ends. Otherwise it is told.
            self._outgoing.append(NOOP if reason == CLIENT_CLOSED else CLOSE)
            self._poll_waiter.set_result(None)
        if self.ws is not None:
            send, self.ws = self.ws, None
            if self._flusher is not None:
                self._flusher.cancel()
            asyncio.get_running_loop().create_task(_close_websocket(send))
        try:
            self._server.handler.on_close(self, reason)
        except Exception:
            log.exception("engine.io: close handler failed")

    def _receive(self, packet_type: str, data: str | bytes) -> None:
        if self.closing:
            return  # nothing after the client's own close
        if packet_type == MESSAGE:
            self._server.handler.on_message(self, data)
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

    def _end_waiting_poll(self) -> None:
        if (
            self.polling
            and not self.closed
            and self._poll_waiter is not None
            and not self._poll_waiter.done()
        ):
            self._push(NOOP)

    def _take_payload(self) -> str:
        packets = []
        while self._outgoing:
            packet = self._outgoing.popleft()
            packets.append(packet if isinstance(packet, str) else "b" + base64.b64encode(packet).decode())
        self._wake_drained()
        return SEPARATOR.join(packets)


async def _close_websocket(send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
    try:
        await send({"type": "websocket.close", "code": 1000})
    except Exception:
        pass


def _query(scope: Any) -> dict[str, str]:
    parsed = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
    return {key: values[0] for key, values in parsed.items()}


def _header(scope: Any, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return str(value.decode("latin-1"))
    return None


class EngineServer:
    """The Engine.IO endpoint. `origin_allowed(scope)` guards every request, not only the
    handshake: a request from another origin is refused (403) and its response allows no
    origin, whatever sid it names. `admit(scope)` returns None to accept a new session, or the
    reason to refuse it (draining, capacity) as (HTTP status, message)."""

    def __init__(
        self,
        handler: EngineHandler,
        config: EngineConfig,
        *,
        admit: Callable[[Any], tuple[int, str] | None] | None = None,
        origin_allowed: Callable[[Any], bool] | None = None,
    ) -> None:
        self.handler = handler
        self.config = config
        self.admit = admit or (lambda scope: None)
        self.origin_allowed = origin_allowed or (lambda scope: True)
        self.sessions: dict[str, EngineSession] = {}

    def forget(self, session: EngineSession) -> None:
        self.sessions.pop(session.sid, None)

    def _handshake_payload(self, sid: str, upgrades: list[str]) -> str:
        return OPEN + json.dumps(
            {
                "sid": sid,
                "upgrades": upgrades,
                "pingInterval": int(self.config.ping_interval * 1000),
                "pingTimeout": int(self.config.ping_timeout * 1000),
                "maxPayload": self.config.max_payload,
            },
            separators=(",", ":"),
        )

    async def run_heartbeat(self) -> None:
        """The one timer of every session: pings when due, closes those whose pong is late."""
        tick = max(0.02, min(self.config.ping_interval, self.config.ping_timeout) / 5)
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            for session in list(self.sessions.values()):
                if session.pong_deadline is not None:
                    if now >= session.pong_deadline:
                        session.close("ping timeout")
                elif now >= session.next_ping and not session.upgrading:
                    # From the scheduled time, not this tick's: the deadline is exact.
                    session.pong_deadline = session.next_ping + self.config.ping_timeout
                    session.next_ping += self.config.ping_interval
                    session._push(PING)

    # -- ASGI -----------------------------------------------------------------------------

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        query = _query(scope)
        if not self.config.cors_any_origin and not self.origin_allowed(scope):
            if scope["type"] == "websocket":
                if await receive() == {"type": "websocket.connect"}:
                    await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
            else:
                await self._respond(send, 403, json.dumps({"code": 4, "message": "Origin not allowed"}))
            return
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send, query)
        else:
            await self._http(scope, receive, send, query)

    def _cors(self, scope: Any) -> list[tuple[bytes, bytes]]:
        if self.config.cors_any_origin:
            return [(b"access-control-allow-origin", b"*")]
        origin = _header(scope, b"origin")
        if origin is None:
            return []
        # Reached only for an origin `origin_allowed` accepted: credentials (the session cookie)
        # allowed.
        return [
            (b"access-control-allow-origin", origin.encode("latin-1")),
            (b"access-control-allow-credentials", b"true"),
            (b"vary", b"Origin"),
        ]

    async def _respond(
        self,
        send: Any,
        status: int,
        body: str | bytes,
        headers: Sequence[tuple[bytes, bytes]] = (),
    ) -> None:
        data = body.encode() if isinstance(body, str) else body
        content_type = b"application/json" if status >= 400 else b"text/plain; charset=UTF-8"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", str(len(data)).encode()),
                    *headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def _error(self, send: Any, status: int, code: int, message: str, scope: Any) -> None:
        body = json.dumps({"code": code, "message": message})
        await self._respond(send, status, body, self._cors(scope))

    async def _http(self, scope: Any, receive: Any, send: Any, query: dict[str, str]) -> None:
        method = scope["method"]
        if method == "OPTIONS":  # CORS preflight
            headers = [
                *self._cors(scope),
                (b"access-control-allow-methods", b"GET, POST"),
                (b"access-control-allow-headers", b"content-type"),
            ]
            await self._respond(send, 204, b"", headers)
            return
        if query.get("EIO") != "4":
            await self._error(send, 400, 5, "Unsupported protocol version", scope)
            return
        if query.get("transport") != "polling":
            await self._error(send, 400, 0, "Transport unknown", scope)
            return
        sid = query.get("sid")
        if sid is None:
            if method != "GET":
                await self._error(send, 400, 2, "Bad handshake method", scope)
                return
            refused = self.admit(scope)
            if refused is not None:
                await self._error(send, refused[0], 4, refused[1], scope)
                return
            opened = self._open(scope, None)
            headers = self._cors(scope)
            if self.config.affinity_cookie is not None:
                name, value = self.config.affinity_cookie
                headers.append((b"set-cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Lax".encode()))
            await self._respond(send, 200, self._handshake_payload(opened.sid, ["websocket"]), headers)
            self.handler.on_open(opened)
            return
        session = self.sessions.get(sid)
        if (
            session is not None
            and session.pong_deadline is not None
            and time.monotonic() >= session.pong_deadline
        ):
            session.close("ping timeout")  # due now, whether or not the timer has run yet
        if session is not None and not session.polling and not session.closed:
            # Upgraded: polling is over for this sid. Answered after the same moment as a poll
            # during the upgrade, so that the client has the upgrade's own replies first.
            await session.upgrade_settled()
        if session is None or session.closed or not session.polling:
            await self._error(send, 400, 1, "Session ID unknown", scope)
            return
        if method == "GET":
            await self._poll(session, scope, receive, send)
        elif method == "POST":
            await self._post(session, scope, receive, send)
        else:
            await self._error(send, 400, 2, "Bad request method", scope)

    def _open(self, scope: Any, ws: Any | None) -> EngineSession:
        sid = secrets.token_urlsafe(15)
        session = EngineSession(self, sid, scope, ws)
        self.sessions[sid] = session
        return session

    async def _poll(self, session: EngineSession, scope: Any, receive: Any, send: Any) -> None:
        if session._poll_waiter is not None and not session._poll_waiter.done():
            session.close("two polls at once")
            await self._error(send, 400, 3, "Bad request: overlapping poll", scope)
            return
        if session.closing:
            await self._respond(send, 200, NOOP, self._cors(scope))
            session.close(CLIENT_CLOSED)
            return
        if session.probed:
            # Upgrading: this poll only needs to end, with a noop after a moment (as engine.io's
            # 100 ms check does), or with 400 if the upgrade completed meanwhile.
            await asyncio.sleep(PROBE_NOOP_DELAY)
            if not session.polling or session.closed:
                await self._error(send, 400, 1, "Session ID unknown", scope)
            else:
                await self._respond(send, 200, NOOP, self._cors(scope))
            return
        if not session._outgoing:
            waiter = session._poll_waiter = asyncio.get_running_loop().create_future()
            disconnected = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                await asyncio.wait([waiter, disconnected], return_when=asyncio.FIRST_COMPLETED)
            finally:
                disconnected.cancel()
                session._poll_waiter = None
            if not waiter.done():  # the client went away mid-poll
                return
            if not session.polling:  # upgraded while this poll waited
                await session.upgrade_settled()
                await self._error(send, 400, 1, "Session ID unknown", scope)
                return
        await self._respond(send, 200, session._take_payload(), self._cors(scope))

    async def _post(self, session: EngineSession, scope: Any, receive: Any, send: Any) -> None:
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.config.max_payload:
                session.close("payload too large")
                await self._error(send, 413, 3, "Payload too large", scope)
                return
            if not message.get("more_body"):
                break
        try:
            text = body.decode("utf-8")
            for raw in text.split(SEPARATOR):
                if raw.startswith("b"):
                    session._receive(MESSAGE, base64.b64decode(raw[1:], validate=True))
                else:
                    session._receive(*decode_packet(raw))
                if session.closed or session.closing:
                    break
        except (ProtocolError, ValueError) as exc:
            session.close(f"bad packet ({exc})")
            await self._error(send, 400, 3, "Bad request", scope)
            return
        await self._respond(send, 200, "ok", self._cors(scope))

    async def _websocket(self, scope: Any, receive: Any, send: Any, query: dict[str, str]) -> None:
        if await receive() != {"type": "websocket.connect"}:
            return
        if query.get("EIO") != "4" or query.get("transport") != "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        sid = query.get("sid")
        if sid is None:
            refused = self.admit(scope)
            if refused is not None:
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                return
            await send({"type": "websocket.accept"})
            session = self._open(scope, send)
            session._push(self._handshake_payload(session.sid, []))
            self.handler.on_open(session)
        else:
            existing = self.sessions.get(sid)
            await send({"type": "websocket.accept"})  # a refusal after accept: clients see a close
            if existing is None or not existing.polling or existing.upgrading or existing.closing:
                # A second upgrade of one session: refused after a moment, as a poll during an
                # upgrade is answered, so the upgrade in progress is answered first.
                await asyncio.sleep(PROBE_NOOP_DELAY)
                await send({"type": "websocket.close", "code": 1008})
                return
            session = existing
            if not await self._upgrade(session, receive, send):
                return
        await self._read_websocket(session, receive)

    async def _upgrade(self, session: EngineSession, receive: Any, send: Any) -> bool:
        session.upgrading = True
        try:
            async with asyncio.timeout(self.config.upgrade_timeout):
                while True:
                    message = await receive()
                    if message["type"] == "websocket.disconnect":
                        return False
                    text = message.get("text")
                    if text == PING + "probe":
                        await send({"type": "websocket.send", "text": PONG + "probe"})
                        session.probed = True
                        # A waiting poll ends with a noop after a moment (engine.io's 100 ms
                        # check), so the client stops polling; if the upgrade completes first
                        # (the poll raced the frames in), it ends with 400 instead.
                        asyncio.get_running_loop().call_later(PROBE_NOOP_DELAY, session._end_waiting_poll)
                    elif text == UPGRADE:
                        break
                    else:
                        raise ProtocolError("unexpected packet during upgrade")
        except ProtocolError as exc:
            session.close(f"bad upgrade ({exc})")
            await _close_websocket(send)
            return False
        except TimeoutError:
            log.debug(
                "engine.io: upgrade not completed in %.1fs; polling goes on", self.config.upgrade_timeout
            )
            await _close_websocket(send)
            return False
        finally:
            session.upgrading = session.probed = False
            # Pings paused during the upgrade: one missed is due now, not a catch-up of several.
            session.next_ping = max(session.next_ping, time.monotonic())
        if session.closed:
            await _close_websocket(send)
            return False
        pending = [p for p in session._outgoing if p != NOOP]
        session._outgoing.clear()
        session.polling = False
        session.upgraded_at = time.monotonic()
        session.ws = send
        if session._poll_waiter is not None and not session._poll_waiter.done():
            session._poll_waiter.set_result(None)
        for packet in pending:
            session._push(
                base64.b64decode(packet[1:]) if isinstance(packet, str) and packet[:1] == "b" else packet
            )
        return True

    async def _read_websocket(self, session: EngineSession, receive: Any) -> None:
        try:
            while not session.closed:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    session.ws = None
                    session.close("transport closed")
                    return
                data = message.get("bytes")
                if data is not None:
                    if len(data) > self.config.max_payload:
                        raise ProtocolError("frame too large")
                    session._receive(MESSAGE, data)
                    continue
                text = message.get("text") or ""
                if len(text) > self.config.max_payload:
                    raise ProtocolError("frame too large")
                session._receive(*decode_packet(text))
        except ProtocolError as exc:
            session.close(f"bad packet ({exc})")
        except Exception as exc:  # the connection broke under us
            session.ws = None
            session.close(f"transport error ({exc.__class__.__name__})")


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
