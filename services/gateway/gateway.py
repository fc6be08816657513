"""The gateway's core: its tabs, what they ask for, and its lifecycle. No transport in here.

A transport (`websocket_transport.py`, `socketio_transport.py`) admits a connection, opens a
`Tab` with its own `Link`, hands the tab's messages to its `TabProtocol` and the resulting
actions to `apply`, and closes it; the core never asks which transport a tab uses. The core
composes the parts, each in a file named for its role:

  hub.py               who is in which session and room here (pure), and the cart rule
  writer.py            each tab's outbox and writer task; slow consumers are dropped
  ownership.py         which routes this gateway holds, as Redis knows it
  fetcher_requests.py  asking the fetchers for carts (joins, gets, refreshes)
  fanout.py            what Redis delivers, to the tabs it is for
  relays.py            a tab's message to the other tabs of its session or room
  shutdown.py          every duration of a shutdown, from DRAIN_SECONDS

A push travels: Redis -> `Fanout.on_message` -> `Writer.enqueue` -> the tab's writer task ->
`Link.write`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

from shared.envelopes import GET, JOIN
from shared.gc_tuning import keep_long_lived_frozen
from shared.keys import Keys
from shared.metrics import GatewayMetrics
from shared.protocol import CloseCode, room_route
from shared.redis_topology import RedisTopology
from shared.registry import RedisOwnershipRegistry
from shared.settings import GatewaySettings
from shared.subscription import Subscriptions
from shared.supervision import supervise

from .budgets import Limits
from .fanout import Fanout
from .fetcher_requests import FetcherRequests
from .hub import Hub
from .outbox import Outbox, Outgoing
from .ownership import Ownership
from .relays import Relays
from .rendering import stamp
from .shutdown import FLUSH_SECONDS
from .tab import Link, Tab
from .tab_protocol import (
    Action,
    Close,
    JoinRoom,
    JoinSession,
    LeaveRoom,
    RelayToRoom,
    RelayToSession,
    RequestCart,
    Send,
    TabProtocol,
    is_origin_allowed,
    joined_messages,
    page_scheme,
    session_from_cookie,
)
from .writer import Writer

log = logging.getLogger(__name__)

PING_SLICES = 20  # server_ping goes to 1/20 of the tabs every interval/20: no 1000-tab burst
Loop = tuple[str, Coroutine[Any, Any, None]]


class Gateway:
    def __init__(self, settings: GatewaySettings, *, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.id = settings.gateway_id
        self.topology = RedisTopology(settings.redis)
        self.keys = Keys(settings.redis.prefix, self.topology.key_groups)
        self.metrics = metrics or GatewayMetrics()
        self.redis = self.topology.command_client()
        self.registry = RedisOwnershipRegistry(self.redis, self.keys, self.id, settings.ownership_ttl_seconds)
        self.limits = Limits.of(
            settings.bad_message_burst, settings.bad_message_refill_per_second, settings.message_budgets
        )
        self.tabs: dict[int, Tab] = {}
        self.hub: Hub[Tab] = Hub()
        self.writer = Writer(self.metrics, self._detach)
        self.requests = FetcherRequests(
            self.redis,
            self.topology,
            self.keys,
            self.id,
            self.hub,
            timeout=settings.request_timeout_seconds,
            metrics=self.metrics,
            reply=self.writer.send,
        )
        self.ownership = Ownership(
            self.registry, self.hub, settings.ownership_ttl_seconds, has_sockets=lambda: bool(self.tabs)
        )
        self.fanout = Fanout(self.hub, self.tabs, self.writer, self.requests, self.metrics)
        self.relays = Relays(
            self.hub, self.writer, self.registry, self.redis, self.topology, self.keys, self.id
        )
        self.subscription = Subscriptions(
            self.topology,
            self.redis,
            own=[self.keys.gateway_channel(self.id), self.keys.gateways_channel],
            on_message=self.fanout.on_message,
            on_connected=self._on_subscribed,
            name=f"gateway {self.id}",
            on_state=lambda up: self.metrics.redis_subscription_up.set(1 if up else 0),
            on_deaf=self.metrics.redis_deaf.inc,
        )
        self.draining = False  # set by `drain` only
        self.failure: str | None = None  # set when an essential background loop died
        self._ids = itertools.count(1)
        self._not_tabs: list[Callable[[], int]] = []  # see `also_count`
        self._tasks: list[asyncio.Task[None]] = []
        self.metrics.redis_last_message_age.set_function(lambda: self.subscription.last_message_age)
        self.metrics.requests_pending.set_function(lambda: len(self.requests.pending))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, transport_loops: Iterable[Loop] = ()) -> None:
        """Start the background loops (the core's, and those a transport brings)."""
        await self.topology.connect()
        loops: list[Loop] = [
            *self.subscription.loops(),
            *self.topology.loops(self.redis),
            *self.ownership.loops(),
            *self.requests.loops(),
            ("server-ping", self._send_server_pings()),
            ("gc-freeze", keep_long_lived_frozen()),
            *transport_loops,
        ]
        self._tasks = [asyncio.create_task(loop, name=name) for name, loop in loops]
        for task in self._tasks:
            supervise(task, self._on_loop_died)
        log.info("gateway %s started: %r", self.id, self.settings)

    def _on_loop_died(self, what: str) -> None:
        # Every loop is essential (a dead one means deaf, unrefreshed or unreleased state):
        # fail liveness so the orchestrator restarts this process.
        self.failure = self.failure or f"background task died: {what}"

    async def _on_subscribed(self) -> None:
        # The subscription was down: this gateway may have missed pushes, and Redis may have
        # restarted empty. Claim again what it holds, and ask for fresh carts of every session.
        await self.ownership.claim_all()
        if self.hub.session_ids:
            await self.requests.refresh(self.hub.session_ids.values())

    async def stop(self) -> None:
        await self.drain()
        await self.ownership.leave()
        self.subscription.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.redis.aclose()
        await self.topology.aclose()

    @property
    def ready(self) -> bool:
        return (
            self.subscription.healthy
            and self.topology.commands_healthy
            and not self.draining
            and self.failure is None
        )

    async def drain(self) -> None:
        """Hand every tab over to the other gateways without a stampede or a lost update
        (`shutdown.py` has the durations).

        Readiness turns false and new handshakes are refused at once. Every tab is told
        `reconnect_required` with a `retryAfterMs` spread over the drain window; tabs that do
        not close by themselves are closed with 1001, paced evenly over the same window (old
        clients reconnect a fixed time after the close). Until its connection closes a tab is
        still served: the subscription and the session claims stay up during the drain.
        """
        if self.draining:
            return
        self.draining = True
        self.metrics.draining.set(1)
        window = self.settings.drain_seconds
        tabs = list(self.tabs.values())
        random.shuffle(tabs)
        log.info("draining %d tab(s) over %.1fs", len(tabs), window)
        for tab in tabs:
            self.writer.send(
                tab,
                {
                    "type": "reconnect_required",
                    "message": "This server is restarting; please reconnect",
                    "retryAfterMs": random.randint(0, int(window * 1000)),
                },
            )
        started = time.monotonic()
        for i, tab in enumerate(tabs):
            due = started + window * i / len(tabs)
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            self.writer.close_after_flush(tab, CloseCode.GOING_AWAY, "server restarting")
        writers = [t.writer for t in tabs if t.writer is not None and not t.writer.done()]
        if writers:
            await asyncio.wait(writers, timeout=FLUSH_SECONDS)

    # -- admission -------------------------------------------------------------------------

    def origin_allowed(
        self, origin: str | None, host: str | None, url_scheme: str, forwarded_proto: str | None
    ) -> bool:
        """The Origin guard (`tab_protocol.is_origin_allowed`); a refusal is counted and logged."""
        scheme = page_scheme(url_scheme, forwarded_proto, self.settings.trust_forwarded_proto)
        if is_origin_allowed(origin, host, self.settings.allowed_origins, scheme):
            return True
        self.metrics.handshakes_rejected.labels("origin").inc()
        log.warning("refused a request from origin %r (host %r, expected %s)", origin, host, scheme)
        return False

    def also_count(self, connections: Callable[[], int]) -> None:
        """A transport's connections that are not tabs (yet) count against MAX_CONNECTIONS too
        (Engine.IO sessions without a Socket.IO CONNECT)."""
        self._not_tabs.append(connections)

    def connection_count(self) -> int:
        """Every connection this gateway holds, on both transports, together."""
        return len(self.tabs) + sum(count() for count in self._not_tabs)

    def load_refusal(self) -> tuple[int, str] | None:
        """Why a new connection is refused now (HTTP status, message), or None: a drain, or the
        connection cap. One rule for both transports."""
        if self.draining:
            self.metrics.handshakes_rejected.labels("draining").inc()
            return 503, "This server is restarting; try another"
        if self.connection_count() >= self.settings.max_connections:
            self.metrics.handshakes_rejected.labels("capacity").inc()
            return 503, "This server is full; try again later"
        return None

    # -- tabs ------------------------------------------------------------------------------

    def open_tab(self, link: Link, protocol: TabProtocol | None = None) -> Tab:
        """Register a new connection (either transport); `greet` then says what it is sent."""
        tab = Tab(
            next(self._ids), link, protocol or TabProtocol(self.limits), Outbox(self.settings.outbox_frames)
        )
        self.tabs[tab.id] = tab
        self.metrics.connections.inc()
        self.metrics.connections_by_transport.labels(link.transport).inc()
        return tab

    def greet(self, tab: Tab, cookie: str | None, *, known_seq: int = 0) -> list[Action]:
        """What a new tab is sent and joins, from its handshake's Cookie header."""
        sid, invalid = session_from_cookie(cookie, self.settings.cookie_names)
        return tab.protocol.on_open(sid, invalid, known_seq=known_seq)

    def close_tab(self, tab: Tab) -> None:
        """The connection is over (either transport): out of every map, its writer stopped."""
        if tab.finished:
            return
        self._detach(tab)
        if tab.writer is not None and not tab.writer.done() and tab.writer is not asyncio.current_task():
            tab.writer.cancel()
        tab.finished = True
        if tab.gone is not None:
            tab.gone.set()
        self.tabs.pop(tab.id, None)
        self.metrics.connections.dec()
        self.metrics.connections_by_transport.labels(tab.link.transport).dec()

    def drop(self, tab: Tab, code: int, reason: str) -> None:
        """Stop serving a tab now (`Writer.drop`)."""
        self.writer.drop(tab, code, reason)

    def close_after_flush(self, tab: Tab, code: int, reason: str) -> None:
        self.writer.close_after_flush(tab, code, reason)

    def _detach(self, tab: Tab) -> None:
        """Take a tab out of its session and rooms (idempotent, never waits). Routes whose last
        local tab this was are released in the next batch (`ownership.py`)."""
        if tab.detached:
            return
        tab.detached = True
        tab.protocol.closed = True
        self._leave_session(tab)
        for room in list(tab.protocol.rooms):
            self._leave_room(tab, room)

    async def apply(self, tab: Tab, actions: Iterable[Action]) -> None:
        """Carry out what the tab's protocol decided, in order."""
        for action in actions:
            if tab.detached:
                return  # dropped meanwhile (slow consumer, failed writer): nothing more to do
            if isinstance(action, Send):
                self.writer.send(tab, action.message)
            elif isinstance(action, JoinSession):
                await self._join_session(tab, action)
            elif isinstance(action, RequestCart):
                self.requests.ask(tab, GET, action.request_id, action.has_request_id)
            elif isinstance(action, RelayToSession):
                await self.relays.to_session(tab, action.text)
            elif isinstance(action, RelayToRoom):
                await self.relays.to_room(tab, action.room_id, action.text)
            elif isinstance(action, JoinRoom):
                await self._join_room(tab, action)
            elif isinstance(action, LeaveRoom):
                self._leave_room(tab, action.room_id)
                for message in action.replies:
                    self.writer.send(tab, message)
            elif isinstance(action, Close):
                self.writer.close_after_flush(tab, action.code, action.reason)

    # -- sessions --------------------------------------------------------------------------

    async def _join_session(self, tab: Tab, action: JoinSession) -> None:
        session, first, released = self.hub.join_session(tab, action.session_id)
        if released is not None:
            self.ownership.release_later(released)
        self.metrics.sessions_held.set(len(self.hub.sessions))
        if first:
            await self.ownership.claim(session)
            if tab.detached:  # closed while the claim was on its way: nothing left to greet
                return
        for message in joined_messages(action, len(self.hub.sessions[session])):
            self.writer.send(tab, message)
        if action.known_seq:
            # A Socket.IO tab back with the offset (seq) of the cart it shows: never sent that
            # cart again, and not even asked for when another tab here has the same newest seq.
            newest = self.hub.newest_seq(session, besides=tab)
            tab.cart_seq = action.known_seq
            if newest and newest == action.known_seq:
                self.metrics.carts_recovered.inc()
                return
        # Claimed before asking: a change after this point is pushed, one before is in the reply.
        self.requests.ask(tab, JOIN)

    def _leave_session(self, tab: Tab) -> None:
        released = self.hub.leave_session(tab)
        if released is not None:
            self.metrics.sessions_held.set(len(self.hub.sessions))
            self.ownership.release_later(released)

    # -- entity and user rooms -------------------------------------------------------------

    async def _join_room(self, tab: Tab, action: JoinRoom) -> None:
        first, size = self.hub.join_room(tab, action.room_id)
        if first:
            await self.ownership.claim(room_route(action.room_id))
            if tab.detached:
                return
        for message in action.replies:
            if message.get("type") == "room_joined":
                message = {**message, "roomSize": size}
            self.writer.send(tab, message)

    def _leave_room(self, tab: Tab, room: str) -> None:
        if self.hub.leave_room(tab, room):
            self.ownership.release_later(room_route(room))

    # -- keep-alive ------------------------------------------------------------------------

    async def _send_server_pings(self) -> None:
        """Every tab gets a `server_ping` once per interval, a slice of them at a time: the
        whole set at once stopped the event loop for 70-105 ms at 1000 tabs."""
        step = self.settings.server_ping_interval_seconds / PING_SLICES
        while True:
            tabs = list(self.tabs.values())
            text = stamp({"type": "server_ping", "id": f"ping_{uuid.uuid4().hex[:16]}"})
            outgoing = Outgoing(text, "server_ping")
            per_slice = -(-len(tabs) // PING_SLICES)
            for i in range(PING_SLICES):
                await asyncio.sleep(step)
                for tab in tabs[i * per_slice : (i + 1) * per_slice]:
                    self.writer.enqueue(tab, outgoing)  # a tab closed meanwhile is detached: skipped
