"""Engine.IO v4, server side: the endpoint for sessions over HTTP long-polling and WebSocket.

What Socket.IO (`socketio.py`) runs on. An `EngineServer` is an ASGI handler for one path
(`/socket.io/`): it answers the handshake (`0{"sid",...}`), hands each session
(`engineio_session.py`) what its client sends, answers its polls, and closes a session that is
malformed, too large, over its packet budget, silent past `ping_interval + ping_timeout`, or
polled twice at once. Every malformed input closes only its own session.

* Heartbeat: the server pings every `ping_interval` and expects a pong within `ping_timeout`.
  One timer task for all sessions (`run_heartbeat`), not a task per session.
* Upgrade: a WebSocket with the session's `sid` answers `2probe` with `3probe`, ends a waiting
  poll with `6` 100 ms later, and takes over at `5`; from then on polling requests for the sid
  (a poll still waiting included) get 400 and a second WebSocket for it is closed.
* A session keeps only what its owner needs of the handshake (`kept_headers`), never the whole
  request: 25 handshakes with a 4 MB header kept 76 MiB.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any
from urllib.parse import parse_qs

from .engineio_session import (
    CLIENT_CLOSED,
    MESSAGE,
    NOOP,
    OPEN,
    OUTGOING_FULL,
    PING,
    PONG,
    PROBE_NOOP_DELAY,
    SEPARATOR,
    UPGRADE,
    EngineConfig,
    EngineHandler,
    EngineSession,
    Message,
    ProtocolError,
    decode_packet,
    write_or_abort,
)

__all__ = ["OUTGOING_FULL", "EngineConfig", "EngineHandler", "EngineServer", "EngineSession", "Message"]

log = logging.getLogger(__name__)
Abort = Callable[[], None]


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
    reason to refuse it (draining, capacity) as (HTTP status, message). `abort_of(scope)` gives
    the callable that drops a request's connection, where the server offers one."""

    def __init__(
        self,
        handler: EngineHandler,
        config: EngineConfig,
        *,
        admit: Callable[[Any], tuple[int, str] | None] | None = None,
        origin_allowed: Callable[[Any], bool] | None = None,
        abort_of: Callable[[Any], Abort | None] | None = None,
        kept_headers: Sequence[bytes] = (b"cookie", b"origin", b"host", b"x-forwarded-proto"),
    ) -> None:
        self.handler = handler
        self.config = config
        self.admit = admit or (lambda scope: None)
        self.origin_allowed = origin_allowed or (lambda scope: True)
        self.abort_of = abort_of or (lambda scope: None)
        self.kept_headers = frozenset(kept_headers)
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
                if session.closed:
                    continue
                if session.pong_deadline is not None:
                    if now >= session.pong_deadline:
                        session.close("ping timeout")
                elif now >= session.next_ping and not session.upgrading:
                    # From the scheduled time, not this tick's: the deadline is exact.
                    session.pong_deadline = session.next_ping + self.config.ping_timeout
                    session.next_ping += self.config.ping_interval
                    session.push(PING)

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
        abort: Abort | None = None,
    ) -> None:
        """A whole response, which the peer must take within `write_deadline` (else, when the
        server offers `abort`, its connection is dropped: a poll of 2.8 MB to a peer that did
        not read stayed queued for good)."""
        data = body.encode() if isinstance(body, str) else body
        content_type = b"application/json" if status >= 400 else b"text/plain; charset=UTF-8"
        start = {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(data)).encode()),
                *headers,
            ],
        }
        deadline = self.config.write_deadline
        try:
            await write_or_abort(send, start, deadline, abort)
            await write_or_abort(send, {"type": "http.response.body", "body": data}, deadline, abort)
        except TimeoutError:
            log.debug("engine.io: a response was not taken in %.0fs; connection dropped", deadline)

    async def _error(self, send: Any, status: int, code: int, message: str, scope: Any) -> None:
        body = json.dumps({"code": code, "message": message})
        await self._respond(send, status, body, self._cors(scope), self.abort_of(scope))

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
            await self._open_polling(scope, send, method)
            return
        session = self.sessions.get(sid)
        if session is not None and session.closed and method == "GET":
            final = session.take_final_poll()  # closed with a flush: the last poll takes the rest
            if final is not None:
                await self._respond(send, 200, final, self._cors(scope), self.abort_of(scope))
                return
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

    async def _open_polling(self, scope: Any, send: Any, method: str) -> None:
        if method != "GET":
            await self._error(send, 400, 2, "Bad handshake method", scope)
            return
        refused = self.admit(scope)
        if refused is not None:
            await self._error(send, refused[0], 4, refused[1], scope)
            return
        opened = self._open(scope, None, None)
        headers = self._cors(scope)
        if self.config.affinity_cookie is not None:
            name, value = self.config.affinity_cookie
            headers.append((b"set-cookie", f"{name}={value}; Path=/; HttpOnly; SameSite=Lax".encode()))
        payload = self._handshake_payload(opened.sid, ["websocket"])
        await self._respond(send, 200, payload, headers, self.abort_of(scope))
        self.handler.on_open(opened)

    def _open(self, scope: Any, ws: Any | None, abort: Abort | None) -> EngineSession:
        sid = secrets.token_urlsafe(15)
        kept = {
            "type": scope.get("type"),
            "scheme": scope.get("scheme", "http"),
            "headers": [(k, v) for k, v in scope.get("headers", ()) if k in self.kept_headers],
        }
        session = EngineSession(sid, kept, self.config, self.handler, self.forget, ws, abort)
        self.sessions[sid] = session
        return session

    async def _poll(self, session: EngineSession, scope: Any, receive: Any, send: Any) -> None:
        abort = self.abort_of(scope)
        if session.poll_waiting():
            session.close("two polls at once")
            await self._error(send, 400, 3, "Bad request: overlapping poll", scope)
            return
        if session.closing:
            await self._respond(send, 200, NOOP, self._cors(scope), abort)
            session.close(CLIENT_CLOSED)
            return
        if session.probed:
            # Upgrading: this poll only needs to end, with a noop after a moment (as engine.io's
            # 100 ms check does), or with 400 if the upgrade completed meanwhile.
            await asyncio.sleep(PROBE_NOOP_DELAY)
            if not session.polling or session.closed:
                await self._error(send, 400, 1, "Session ID unknown", scope)
            else:
                await self._respond(send, 200, NOOP, self._cors(scope), abort)
            return
        if not session.has_outgoing():
            disconnected = asyncio.ensure_future(_wait_disconnect(receive))
            try:
                answered = await session.wait_for_outgoing(disconnected)
            finally:
                disconnected.cancel()
            if not answered:  # the client went away mid-poll
                return
            if not session.polling:  # upgraded while this poll waited
                await session.upgrade_settled()
                await self._error(send, 400, 1, "Session ID unknown", scope)
                return
        await self._respond(send, 200, session.take_payload(), self._cors(scope), abort)

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
        packets = body.count(SEPARATOR.encode()) + 1
        if packets > self.config.max_packets_per_post or not session.spend(packets):
            # Counted before one packet is handled (bytes.count runs in C): the cost of a
            # refusal does not grow with the flood.
            session.close(f"too many packets ({packets} in one request, or past the budget)")
            await self._error(send, 400, 3, "Too many packets", scope)
            return
        try:
            text = body.decode("utf-8")
            for raw in text.split(SEPARATOR):
                if raw.startswith("b"):
                    session.receive(MESSAGE, base64.b64decode(raw[1:], validate=True))
                else:
                    session.receive(*decode_packet(raw))
                if session.closed or session.closing:
                    break
        except (ProtocolError, ValueError) as exc:
            session.close(f"bad packet ({exc})")
            await self._error(send, 400, 3, "Bad request", scope)
            return
        await self._respond(send, 200, "ok", self._cors(scope), self.abort_of(scope))

    async def _websocket(self, scope: Any, receive: Any, send: Any, query: dict[str, str]) -> None:
        if await receive() != {"type": "websocket.connect"}:
            return
        if query.get("EIO") != "4" or query.get("transport") != "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        abort = self.abort_of(scope)
        sid = query.get("sid")
        if sid is None:
            refused = self.admit(scope)
            if refused is not None:
                await send({"type": "websocket.close", "code": 1008})  # before accept: HTTP 403
                return
            await send({"type": "websocket.accept"})
            session = self._open(scope, send, abort)
            session.push(self._handshake_payload(session.sid, []))
            self.handler.on_open(session)
        else:
            existing = self.sessions.get(sid)
            await send({"type": "websocket.accept"})  # a refusal after accept: clients see a close
            if (
                existing is None
                or existing.closed
                or not existing.polling
                or existing.upgrading
                or existing.closing
            ):
                # A second upgrade of one session: refused after a moment, as a poll during an
                # upgrade is answered, so the upgrade in progress is answered first.
                await asyncio.sleep(PROBE_NOOP_DELAY)
                await send({"type": "websocket.close", "code": 1008})
                return
            session = existing
            if not await self._upgrade(session, receive, send, abort):
                return
        await self._read_websocket(session, receive)

    async def _upgrade(self, session: EngineSession, receive: Any, send: Any, abort: Abort | None) -> bool:
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
                        asyncio.get_running_loop().call_later(PROBE_NOOP_DELAY, session.end_waiting_poll)
                    elif text == UPGRADE:
                        break
                    else:
                        raise ProtocolError("unexpected packet during upgrade")
        except ProtocolError as exc:
            session.close(f"bad upgrade ({exc})")
            await _close_websocket(send, abort, self.config.write_deadline)
            return False
        except TimeoutError:
            log.debug(
                "engine.io: upgrade not completed in %.1fs; polling goes on", self.config.upgrade_timeout
            )
            await _close_websocket(send, abort, self.config.write_deadline)
            return False
        finally:
            session.upgrading = session.probed = False
            # Pings paused during the upgrade: one missed is due now, not a catch-up of several.
            session.next_ping = max(session.next_ping, time.monotonic())
        if session.closed:
            await _close_websocket(send, abort, self.config.write_deadline)
            return False
        session.take_over(send, abort)
        return True

    async def _read_websocket(self, session: EngineSession, receive: Any) -> None:
        try:
            await self._read_packets(session, receive)
        finally:
            await session.websocket_closed()

    async def _read_packets(self, session: EngineSession, receive: Any) -> None:
        try:
            while not session.closed:
                message = await receive()
                if message["type"] == "websocket.disconnect":
                    session.ws = None
                    session.close("transport closed")
                    return
                if not session.spend():
                    raise ProtocolError("past the packet budget")
                data = message.get("bytes")
                if data is not None:
                    if len(data) > self.config.max_payload:
                        raise ProtocolError("frame too large")
                    session.receive(MESSAGE, data)
                    continue
                text = message.get("text") or ""
                if len(text) > self.config.max_payload:
                    raise ProtocolError("frame too large")
                session.receive(*decode_packet(text))
        except ProtocolError as exc:
            session.close(f"bad packet ({exc})")
        except Exception as exc:  # the connection broke under us
            session.ws = None
            session.close(f"transport error ({exc.__class__.__name__})")


async def _close_websocket(send: Any, abort: Abort | None, deadline: float) -> None:
    try:
        await write_or_abort(send, {"type": "websocket.close", "code": 1000}, deadline, abort)
    except Exception:  # gone already, or aborted for taking nothing
        pass


async def _wait_disconnect(receive: Any) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
