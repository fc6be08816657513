"""Socket.IO tabs on the gateway core: today's Portico frontend, unchanged.

The frontend (socket.io-client 4.8, path `/wss/socket.io`, `transports: ['polling',
'websocket']`) sends and receives the raw protocol's JSON objects as the event `"message"`
on namespace `/`: `42["message",{...}]`. `SocketIOTransport` serves Engine.IO
(`engineio.py`) and Socket.IO (`socketio.py`) on the Socket.IO paths; each Socket.IO
connection to `/` becomes a core `Tab` whose link (`SocketIOLink`) writes as that event, so
sessions, rooms, carts, relays, budgets and drain are the raw WebSocket's, on both transports
of Engine.IO. Everything Socket.IO needs beyond that lives here: admission of Engine.IO
sessions, the input queue of each tab (Engine.IO hands over messages without waiting, the core
handles them in order), the Engine.IO heartbeat, and its metric.

What differs from a raw tab, for that client's sake:
* after `connection_success` an unsolicited `session_update_confirmation {success: true}`
  (the client counts itself connected only on that message, and does not resend
  `update_session` after a reconnect);
* a cart push carries its `seq` as the Socket.IO offset (the event's last argument, with
  connection-state recovery): a tab that reconnects with the offset of the cart this gateway
  last pushed for its session gets no second copy of it;
* closing (drain, slow consumer, rate limit) ends the Engine.IO session without a Socket.IO
  DISCONNECT, so socket.io-client reconnects by itself, as a raw tab would.

A tab that falls behind is handled as a raw one is: once the Engine.IO queue is half full the
link makes the core's writer wait, so newer messages queue in the tab's outbox (a newer cart
replacing a queued one) and a full outbox drops the tab as a slow consumer.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from functools import partial
from typing import Any

from shared.metrics import ENGINEIO_TRANSPORTS
from shared.protocol import CloseCode, mask_session_id

from .budgets import CONNECT
from .engineio import OUTGOING_FULL, EngineConfig, EngineServer
from .gateway import Gateway, Loop
from .socketio import CLIENT_NAMESPACE_DISCONNECT, Socket, SocketIOServer, is_ascii_digits
from .tab import Tab
from .tab_protocol import Action, Send, TabProtocol
from .uvicorn_protocols import abort_of

EVENT = "message"
INBOX_LIMIT = 256  # messages of one tab waiting to be handled (the budgets close it long before)
log = logging.getLogger(__name__)


class SocketIOLink:
    """What the core writes a Socket.IO tab through: one Socket.IO socket. It also holds the
    tab's input queue, handled in order by one task while there is input."""

    __slots__ = ("inbox", "reader", "socket")
    transport = "socketio"

    def __init__(self, socket: Socket) -> None:
        self.socket = socket
        self.inbox: deque[Callable[[], list[Action]] | None] | None = None
        self.reader: asyncio.Task[None] | None = None

    async def write(self, text: str, seq: int) -> None:
        engine_session = self.socket.session
        if engine_session.closed:
            raise ConnectionError("socket.io session closed")
        # A cart push carries its seq as the connection-state-recovery offset.
        self.socket.send_event_json(EVENT, text, str(seq) if seq else None)
        if engine_session.crowded():
            # The tab is behind (a poll not yet back, a slow WebSocket): the core's writer
            # waits, so what follows queues in its outbox, where a newer cart replaces a queued
            # one and a full outbox is a slow consumer, as for a raw tab.
            await engine_session.drained()

    def try_write(self, text: str, seq: int) -> bool:
        engine_session = self.socket.session
        if engine_session.closed or engine_session.crowded():
            return False  # the writer's turn: it raises, or waits for the queue to drain
        self.socket.send_event_json(EVENT, text, str(seq) if seq else None)
        return True

    async def close(self, code: int, reason: str) -> None:
        # What is queued goes out first: a tab past its budget is told RATE_LIMITED (it got
        # 35 of 60 pongs and no error over WebSocket, and nothing at all over polling).
        self.socket.session.close(f"closed by the gateway ({code} {reason})", flush=True)

    def abort(self) -> None:
        engine_session = self.socket.session
        engine_session.close("aborted by the gateway")
        if engine_session.abort is not None:
            engine_session.abort()


class SocketIOTransport:
    """The Engine.IO endpoint for Socket.IO tabs (an ASGI app for the Socket.IO paths)."""

    def __init__(self, gateway: Gateway) -> None:
        settings = gateway.settings
        self.gateway = gateway
        self._tabs = 0  # Socket.IO tabs open: each is one Engine.IO session CONNECTed to `/`
        self.engine = EngineServer(
            SocketIOServer(
                {"/": self},
                connect_timeout=settings.socketio_connect_timeout_seconds,
                # No message of this protocol is binary: attachments are only refused, and never
                # worth more than a frame's worth of memory while they are.
                max_attachment_bytes=settings.max_frame_bytes,
                attachment_timeout=min(10.0, settings.socketio_ping_timeout_seconds),
                recovery=True,
            ),
            EngineConfig(
                ping_interval=settings.socketio_ping_interval_seconds,
                ping_timeout=settings.socketio_ping_timeout_seconds,
                max_payload=settings.max_frame_bytes,
                max_buffered=settings.outbox_frames * 4,
                upgrade_timeout=min(10.0, settings.socketio_ping_timeout_seconds),
                # A peer that takes nothing for as long as its pong may take is gone: aborted.
                write_deadline=min(10.0, settings.socketio_ping_timeout_seconds),
                affinity_cookie=(settings.socketio_affinity_cookie, settings.gateway_id)
                if settings.socketio_affinity_cookie
                else None,
            ),
            admit=self._admit,
            origin_allowed=self._origin_allowed,
            abort_of=abort_of,
        )
        gateway.also_count(self._sessions_without_tab)
        for transport in ENGINEIO_TRANSPORTS:
            gateway.metrics.engineio_sessions.labels(transport).set_function(
                partial(self._engine_sessions, transport)
            )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.engine(scope, receive, send)

    def loops(self) -> list[Loop]:
        return [("engine.io-heartbeat", self.engine.run_heartbeat())]

    def _engine_sessions(self, transport: str) -> int:
        return sum(s.transport == transport for s in self.engine.sessions.values())

    # -- admission -------------------------------------------------------------------------

    def _origin_allowed(self, scope: Any) -> bool:
        headers: dict[bytes, bytes] = {}
        for key, value in scope.get("headers", ()):
            if key in _ORIGIN_HEADERS:
                headers.setdefault(key, value)  # the first, as Starlette's Headers.get

        def header(name: bytes) -> str | None:
            value = headers.get(name)
            return None if value is None else str(value.decode("latin-1"))

        return self.gateway.origin_allowed(
            header(b"origin"), header(b"host"), scope.get("scheme", "http"), header(b"x-forwarded-proto")
        )

    def _admit(self, scope: Any) -> tuple[int, str] | None:
        # The Origin is checked already, on every Engine.IO request (`_origin_allowed`).
        return self.gateway.load_refusal()

    def _sessions_without_tab(self) -> int:
        """Engine.IO sessions not (yet) connected to Socket.IO: they live until
        SOCKETIO_CONNECT_TIMEOUT_SECONDS, so they count against MAX_CONNECTIONS with the tabs,
        summed (the larger of the two counts let a gateway capped at 10 hold 20)."""
        return max(0, len(self.engine.sessions) - self._tabs)

    # -- namespace `/`: each socket is a tab -----------------------------------------------

    def on_connect(self, socket: Socket, auth: dict[str, Any]) -> None:
        # The connection's budgets outlive a namespace DISCONNECT: `41` then `40` made fresh
        # buckets, and one connection sent 150 `update_session` to new ids in 0.4 s.
        state = socket.connection_state
        previous: TabProtocol | None = state.get("protocol")
        if previous is None:
            protocol = TabProtocol(self.gateway.limits)
        else:
            protocol = TabProtocol(self.gateway.limits, **previous.budgets_of())
        state["protocol"] = protocol
        link = SocketIOLink(socket)
        tab = self.gateway.open_tab(link, protocol)
        self._tabs += 1
        socket.data = tab
        if previous is not None and not protocol.spend(CONNECT):
            self._feed(
                tab, link, lambda: protocol.rate_limited("Too many connects on one connection; closing")
            )
            return
        offset = auth.get("offset")
        cookie = _cookie(socket)
        known_seq = (
            int(offset) if isinstance(offset, str) and len(offset) < 20 and is_ascii_digits(offset) else 0
        )
        self._feed(tab, link, lambda: self._opened(tab, cookie, known_seq))

    def _opened(self, tab: Tab, cookie: str | None, known_seq: int) -> list[Action]:
        actions = self.gateway.greet(tab, cookie, known_seq=known_seq)
        if tab.protocol.session_id is not None:
            actions.append(
                Send(
                    {
                        "type": "session_update_confirmation",
                        "success": True,
                        "message": "Session ID taken from the session cookie",
                        "action": "set",
                        "wasRequired": False,
                        "sessionId": mask_session_id(tab.protocol.session_id),
                    }
                )
            )
        return actions

    def on_event(self, socket: Socket, name: str, args: list[Any], ack_id: int | None, binary: bool) -> None:
        tab: Tab | None = socket.data
        if tab is None or not isinstance(tab.link, SocketIOLink):
            return
        protocol = tab.protocol
        if name == EVENT and len(args) >= 1 and isinstance(args[0], dict) and not binary:
            message = args[0]  # parsed once, strictly, by the packet decoder
            self._feed(tab, tab.link, lambda: protocol.on_message(message))
        elif name == EVENT and binary:  # its attachments (bytes) have no JSON form
            self._feed(tab, tab.link, lambda: protocol.on_foreign("socket.io binary message"))
        else:
            self._feed(tab, tab.link, lambda: protocol.on_foreign(f"socket.io event {name[:40]!r}"))

    def on_disconnect(self, socket: Socket, reason: str) -> None:
        tab: Tab | None = socket.data
        if tab is None:
            return
        socket.data = None
        self._tabs -= 1
        link = tab.link
        assert isinstance(link, SocketIOLink)
        if reason == CLIENT_NAMESPACE_DISCONNECT and link.inbox:
            # The client's own DISCONNECT takes its turn after what it sent before: a budget
            # spent by those messages still closes the Engine.IO session, with its
            # RATE_LIMITED (a `41` right behind them cancelled both, and the next `40` started
            # afresh).
            self._feed(tab, link, None)
            return
        if reason.startswith(OUTGOING_FULL):  # a polling tab that stopped polling
            self.gateway.metrics.slow_consumers.labels("closed").inc()
            log.warning("tab %d: outgoing buffer full, dropping slow consumer", tab.id)
        if link.reader is not None and not link.reader.done() and link.reader is not asyncio.current_task():
            link.reader.cancel()
        self.gateway.close_tab(tab)

    # -- the input queue -------------------------------------------------------------------

    def _feed(self, tab: Tab, link: SocketIOLink, make_actions: Callable[[], list[Action]] | None) -> None:
        """Handle a tab's input in arrival order (one task while there is any); None is the
        client's namespace DISCONNECT, after which the tab is closed."""
        if tab.detached:
            return
        if link.inbox is None:
            link.inbox = deque()
        if len(link.inbox) >= INBOX_LIMIT:
            self.gateway.drop(tab, CloseCode.POLICY_VIOLATION, "too many messages queued")
            return
        link.inbox.append(make_actions)
        if link.reader is None:
            link.reader = asyncio.get_running_loop().create_task(self._read_inbox(tab, link))

    async def _read_inbox(self, tab: Tab, link: SocketIOLink) -> None:
        try:
            while link.inbox and not tab.detached:
                make_actions = link.inbox.popleft()
                if make_actions is None:  # the namespace DISCONNECT: what was decided goes out first
                    if tab.writer is not None and tab.outbox.close_code is not None:
                        await asyncio.wait([tab.writer], timeout=CLOSE_FLUSH_SECONDS)
                    break
                self.gateway.metrics.messages_received.labels("text").inc()
                await self.gateway.apply(tab, make_actions())
        except Exception:
            log.exception("tab %d: unexpected error; closing it", tab.id)
            self.gateway.drop(tab, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            link.reader = None
            link.inbox = None
            if link.socket.data is not tab:  # disconnected meanwhile: nothing more for it
                self.gateway.close_tab(tab)


_ORIGIN_HEADERS = frozenset({b"origin", b"host", b"x-forwarded-proto"})
CLOSE_FLUSH_SECONDS = 2.0  # a tab's last messages and close, before its namespace DISCONNECT ends it


def _cookie(socket: Socket) -> str | None:
    for key, value in socket.session.scope.get("headers", ()):
        if key == b"cookie":
            return str(value.decode("latin-1"))
    return None
