"""The gateway's core: its connections, what they ask for, and the ASGI entry.

Per socket (either transport): a `ConnectionProtocol` deciding what each message means, and a
bounded `Outbox` drained by a writer task that exists only while there is something to write
(an idle socket has no task of its own beyond uvicorn's). Per process: cart requests to the
fetchers, batched (`shared.batching`) and swept when unanswered; relays to the other tabs of a
session or room; the application-level `server_ping` spread over its interval. Elsewhere, by
job: the transports (`websocket_transport.py`, `socketio_transport.py`), who is in which
session and room (`hub.py`), Redis ownership (`ownership.py`), what Redis delivers
(`deliveries.py`), pending requests (`cart_requests.py`), shutdown (`shutdown.py`).

A socket that cannot be written to (its writer failed, or its outbox overflowed) is *dropped*:
taken out of every session and room at once, closed with a deadline, then aborted. Nothing
else ever waits on it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route
from starlette.websockets import WebSocket

from shared import codec
from shared.batching import Batcher
from shared.broker import Subscription, create_client
from shared.gc_tuning import keep_long_lived_frozen
from shared.health import health_routes
from shared.keys import Keys
from shared.metrics import ENGINEIO_TRANSPORTS, GatewayMetrics
from shared.protocol import CloseCode, room_route
from shared.registry import RedisOwnershipRegistry
from shared.settings import GatewaySettings
from shared.supervision import supervise

from . import shutdown, websocket_transport
from .cart_requests import RETRY, CartRequests
from .connection import (
    Close,
    ConnectionProtocol,
    JoinRoom,
    JoinSession,
    LeaveRoom,
    Limits,
    RelayToRoom,
    RelayToSession,
    RequestCart,
    Send,
    is_origin_allowed,
    joined_messages,
    page_scheme,
    session_from_cookie,
)
from .deliveries import Deliveries
from .engineio import EngineConfig, EngineServer
from .frames import stamp
from .hub import Hub
from .outbox import Outbox, Outgoing
from .ownership import Ownership
from .socketio import SocketIOServer
from .socketio_transport import PorticoNamespace
from .sockets import ABORT_EXTENSION
from .vendor import BUNDLE_MISSING, SOCKETIO_BUNDLE

log = logging.getLogger(__name__)

CLIENT_JS = Path(__file__).resolve().parent / "static" / "client.js"
REFRESH_BATCH = 500  # session ids per refresh request envelope
REQUEST_BATCH = 500  # cart requests per requests envelope
INBOX_LIMIT = 256  # Socket.IO messages of one client waiting to be handled
PING_SLICES = 20  # server_ping goes to 1/20 of the sockets every interval/20: no 1000-socket burst
REQUEST_ATTEMPTS = 3  # a cart request is sent at most this often (lost, or answered with an older cart)
TIMEOUT_MESSAGE = "Timed out waiting for the cart; please try again"
CLOSE_DEADLINE_SECONDS = 2.0  # a dropped socket gets this long to take its close frame, then is aborted


class Client:
    """One open socket."""

    __slots__ = (
        "cart_seq",
        "detached",
        "finished",
        "gone",
        "id",
        "inbox",
        "outbox",
        "protocol",
        "reader",
        "recovered_seq",
        "session_key",
        "transport",
        "writer",
        "ws",
    )

    def __init__(
        self,
        client_id: int,
        ws: Any,
        protocol: ConnectionProtocol,
        outbox: Outbox,
        transport: str = "websocket",
    ):
        self.id = client_id
        self.ws = ws  # the link: a Starlette WebSocket, or a `socketio_transport.SocketIOLink`
        self.transport = transport  # "websocket" (raw) or "socketio": a bounded metric label
        # Socket.IO only: messages waiting to be handled in order, and the task handling them
        # (a raw socket's receive loop handles its own messages in order).
        self.inbox: deque[Callable[[], list[Any]]] | None = None
        self.reader: asyncio.Task[None] | None = None
        self.recovered_seq = 0  # Socket.IO: the cart seq the tab said it has (its offset)
        self.protocol = protocol
        self.outbox = outbox
        self.session_key: str | None = None  # the session it is in (`hub.py` words)
        self.cart_seq = 0  # seq of the newest cart sent: older ones are never sent after it
        self.writer: asyncio.Task[None] | None = None
        self.detached = False  # out of every map: receives nothing more
        self.finished = False  # the connection is over (serve returned)
        # Created only for a socket being dropped (idle sockets stay small); set when finished.
        self.gone: asyncio.Event | None = None

    def abort(self) -> None:
        """Drop the connection now (`sockets.AbortableWebSocketProtocol` for raw sockets)."""
        abort = getattr(self.ws, "abort", None) or self.ws.scope.get("extensions", {}).get(ABORT_EXTENSION)
        if abort is not None:
            abort()


class Gateway:
    def __init__(self, settings: GatewaySettings, *, metrics: GatewayMetrics | None = None) -> None:
        self.settings = settings
        self.id = settings.gateway_id
        self.keys = Keys(settings.redis.prefix)
        self.metrics = metrics or GatewayMetrics()
        self.client = create_client(settings.redis.url)
        self.registry = RedisOwnershipRegistry(
            self.client, self.keys, self.id, settings.ownership_ttl_seconds
        )
        self.deliveries = Deliveries(self)
        self.subscription = Subscription(
            settings.redis.url,
            [self.keys.gateway_channel(self.id), self.keys.gateways_channel],
            self.deliveries.on_delivery,
            self.deliveries.on_subscribed,
            name=f"gateway {self.id}",
            on_state=lambda up: self.metrics.redis_subscription_up.set(1 if up else 0),
        )
        self.limits = Limits(settings.bad_message_burst, settings.bad_message_refill_per_second)
        self.clients: dict[int, Client] = {}
        self.hub: Hub[Client] = Hub()  # which connection is in which session and room
        self.pending: CartRequests[Client] = CartRequests(
            timeout=settings.request_timeout_seconds, attempts=REQUEST_ATTEMPTS
        )
        self.draining = False
        self.failure: str | None = None  # set when an essential background loop died
        self.ownership = Ownership(
            self.registry, self.hub, settings.ownership_ttl_seconds, has_sockets=lambda: bool(self.clients)
        )
        self.requests: Batcher[list[Any]] = Batcher(
            self._publish_requests, name="cart requests", max_items=REQUEST_BATCH
        )
        self.engine = EngineServer(
            SocketIOServer(
                {"/": PorticoNamespace(self)}, connect_timeout=settings.socketio_connect_timeout_seconds
            ),
            EngineConfig(
                ping_interval=settings.socketio_ping_interval_seconds,
                ping_timeout=settings.socketio_ping_timeout_seconds,
                max_payload=settings.max_frame_bytes,
                max_buffered=settings.outbox_frames * 4,
                upgrade_timeout=min(10.0, settings.socketio_ping_timeout_seconds),
                affinity_cookie=(settings.socketio_affinity_cookie, settings.gateway_id)
                if settings.socketio_affinity_cookie
                else None,
            ),
            admit=self._admit_engine,
            origin_allowed=lambda scope: self.origin_allowed(
                Headers(scope=scope), scope.get("scheme", "http")
            ),
        )
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[None]] = set()
        self.metrics.redis_last_message_age.set_function(lambda: self.subscription.last_message_age)
        self.metrics.requests_pending.set_function(lambda: len(self.pending))
        for transport in ENGINEIO_TRANSPORTS:
            self.metrics.engineio_sessions.labels(transport).set_function(
                partial(self._engine_sessions, transport)
            )

    def _engine_sessions(self, transport: str) -> int:
        return sum(session.transport == transport for session in self.engine.sessions.values())

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)  # keep a reference until done (asyncio holds weak ones)
        task.add_done_callback(self._background.discard)

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self.subscription.run(), name="subscription"),
            *(asyncio.create_task(loop, name=name) for name, loop in self.ownership.loops()),
            asyncio.create_task(self.requests.run(), name="cart-requests"),
            asyncio.create_task(self._send_server_pings(), name="server-ping"),
            asyncio.create_task(self._sweep_requests(), name="request-sweep"),
            asyncio.create_task(keep_long_lived_frozen(), name="gc-freeze"),
            asyncio.create_task(self.engine.run_heartbeat(), name="engine.io-heartbeat"),
        ]
        for task in self._tasks:
            supervise(task, self._on_loop_died)
        log.info("gateway %s started: %r", self.id, self.settings)

    async def drain(self) -> None:
        """Hand every tab to the other gateways (`shutdown.drain`)."""
        await shutdown.drain(self)

    def _on_loop_died(self, what: str) -> None:
        # Every loop is essential (a dead one means deaf, unrefreshed or unreleased state):
        # fail liveness so the orchestrator restarts this process.
        self.failure = self.failure or f"background task died: {what}"

    async def stop(self) -> None:
        await self.drain()
        await self.ownership.leave()
        self.subscription.stop()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.aclose()

    @property
    def ready(self) -> bool:
        return self.subscription.healthy and not self.draining and self.failure is None

    # -- sockets ---------------------------------------------------------------------------

    def origin_allowed(self, headers: Any, url_scheme: str) -> bool:
        """The Origin guard (`connection.is_origin_allowed`); a refusal is counted and logged."""
        origin, host = headers.get("origin"), headers.get("host")
        scheme = page_scheme(
            url_scheme, headers.get("x-forwarded-proto"), self.settings.trust_forwarded_proto
        )
        if is_origin_allowed(origin, host, self.settings.allowed_origins, scheme):
            return True
        self.metrics.handshakes_rejected.labels("origin").inc()
        log.warning("refused a request from origin %r (host %r, expected %s)", origin, host, scheme)
        return False

    def refusal(self, headers: Any, url_scheme: str) -> tuple[int, str] | None:
        """Why a new raw WebSocket is refused (HTTP status, message), or None: the Origin, a
        drain, the connection cap."""
        if not self.origin_allowed(headers, url_scheme):
            return 403, "Origin not allowed"
        return self._load_refusal(len(self.clients))

    def _admit_engine(self, scope: Any) -> tuple[int, str] | None:
        # The Origin is checked already, on every Engine.IO request (`origin_allowed`).
        # Engine.IO sessions not yet connected to Socket.IO count too (they live until
        # SOCKETIO_CONNECT_TIMEOUT_SECONDS): a flood of bare handshakes stays bounded.
        return self._load_refusal(max(len(self.clients), len(self.engine.sessions)))

    def _load_refusal(self, connections: int) -> tuple[int, str] | None:
        """A drain or the connection cap: one rule for both transports' handshakes."""
        if self.draining:
            self.metrics.handshakes_rejected.labels("draining").inc()
            return 503, "This server is restarting; try another"
        if connections >= self.settings.max_connections:
            self.metrics.handshakes_rejected.labels("capacity").inc()
            return 503, "This server is full; try again later"
        return None

    def open_client(self, link: Any, transport: str) -> Client:
        """Register a new connection (either transport); `open_actions` then greets it."""
        client = Client(
            next(self._ids),
            link,
            ConnectionProtocol(self.limits),
            Outbox(self.settings.outbox_frames),
            transport,
        )
        self.clients[client.id] = client
        self.metrics.connections.inc()
        self.metrics.connections_by_transport.labels(transport).inc()
        return client

    def open_actions(self, client: Client, cookie: str | None, *, known_seq: int = 0) -> list[Any]:
        sid, invalid = session_from_cookie(cookie, self.settings.cookie_names)
        client.recovered_seq = known_seq
        return client.protocol.on_open(sid, invalid)

    def close_client(self, client: Client) -> None:
        """The connection is over (either transport): out of every map, tasks stopped."""
        if client.finished:
            return
        self._detach(client)
        for task in (client.writer, client.reader):
            if task is not None and not task.done() and task is not asyncio.current_task():
                task.cancel()
        client.finished = True
        if client.gone is not None:
            client.gone.set()
        self.clients.pop(client.id, None)
        self.metrics.connections.dec()
        self.metrics.connections_by_transport.labels(client.transport).dec()

    def feed(self, client: Client, make_actions: Callable[[], list[Any]]) -> None:
        """Handle a Socket.IO client's input in arrival order (one task while there is any)."""
        if client.detached:
            return
        if client.inbox is None:
            client.inbox = deque()
        if len(client.inbox) >= INBOX_LIMIT:  # the message budgets close it long before this
            self._drop(client, CloseCode.POLICY_VIOLATION, "too many messages queued")
            return
        client.inbox.append(make_actions)
        if client.reader is None:
            client.reader = asyncio.get_running_loop().create_task(self._read_inbox(client))

    async def _read_inbox(self, client: Client) -> None:
        try:
            while client.inbox and not client.detached:
                make_actions = client.inbox.popleft()
                self.metrics.messages_received.labels("text").inc()
                await self.apply(client, make_actions())
        except Exception:
            log.exception("socket %d: unexpected error; closing it", client.id)
            self._drop(client, CloseCode.INTERNAL_ERROR, "internal error")
        finally:
            client.reader = None
            client.inbox = None

    def _wake_writer(self, client: Client) -> None:
        if client.writer is None and not client.detached:
            client.writer = asyncio.get_running_loop().create_task(self._write(client))

    def close_after_flush(self, client: Client, code: int, reason: str) -> None:
        client.outbox.close_after_flush(code, reason)
        self._wake_writer(client)

    async def _write(self, client: Client) -> None:
        """Write what is queued, then end (woken again by the next `enqueue`)."""
        try:
            while (frame := client.outbox.pop()) is not None:
                if frame.seq and client.transport == "socketio":
                    await client.ws.send_cart(frame.text, frame.seq)  # seq as the recovery offset
                else:
                    await client.ws.send_text(frame.text)
                self.metrics.messages_sent.labels(frame.kind).inc()
                self.metrics.bytes_sent.inc(frame.size)
                if frame.received_at is not None:
                    self.metrics.push_latency.observe(max(0.0, time.time() - frame.received_at))
            client.writer = None  # before any await: a frame queued from here on wakes a new one
            if client.outbox.close_code is not None:
                await client.ws.close(client.outbox.close_code, client.outbox.close_reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The peer went away mid-write, or the frame could not be sent at all. Either way
            # this socket can no longer be served: a writer that silently ended left it open
            # and deaf (pings unanswered, pushes lost) while it stayed in every map.
            self.metrics.send_failures.inc()
            log.debug("socket %d: write failed (%s: %s); dropping it", client.id, exc.__class__.__name__, exc)
            self._drop(client, CloseCode.INTERNAL_ERROR, "write failed")

    def _detach(self, client: Client) -> None:
        """Take a socket out of its session and rooms (idempotent, never waits). Routes whose
        last local socket this was are released in the next batch (`ownership.py`)."""
        if client.detached:
            return
        client.detached = True
        client.protocol.closed = True
        self._leave_session(client)
        for room in list(client.protocol.rooms):
            self._leave_room(client, room)

    def _drop(self, client: Client, code: int, reason: str) -> None:
        """Stop serving a socket at once: detached now, closed within CLOSE_DEADLINE_SECONDS,
        aborted if the close cannot be written (a peer that does not read)."""
        if client.detached:
            return
        self._detach(client)
        if client.writer is not None and client.writer is not asyncio.current_task():
            client.writer.cancel()
        self._spawn(self._close_or_abort(client, code, reason))

    async def _close_or_abort(self, client: Client, code: int, reason: str) -> None:
        if client.finished:
            return
        gone = client.gone = asyncio.Event()
        try:
            async with asyncio.timeout(CLOSE_DEADLINE_SECONDS):
                await client.ws.close(code, reason)
                await gone.wait()
        except Exception:  # TimeoutError (the peer does not read) or already disconnected
            pass
        if not client.finished:
            client.abort()

    def send(self, client: Client, message: dict[str, Any]) -> None:
        kind = str(message.get("type"))
        if kind == "error":
            self.metrics.client_errors.labels(str(message.get("code"))).inc()
        self.enqueue(client, Outgoing(stamp(message), kind))

    def enqueue(self, client: Client, frame: Outgoing) -> None:
        if client.detached:
            return
        result = client.outbox.put(frame)
        if result is True:
            self._wake_writer(client)
        elif result is None:
            self.metrics.slow_consumers.labels("cart_replaced").inc()
        elif result is False:
            self.metrics.slow_consumers.labels("closed").inc()
            log.warning("socket %d: outbox full, dropping slow consumer", client.id)  # once: detached now
            self._drop(client, CloseCode.TRY_AGAIN_LATER, "slow consumer")

    async def apply(self, client: Client, actions: Iterable[Any]) -> None:
        for action in actions:
            if client.detached:
                return  # dropped meanwhile (slow consumer, failed writer): nothing more to do
            if isinstance(action, Send):
                self.send(client, action.message)
            elif isinstance(action, JoinSession):
                await self._join_session(client, action)
            elif isinstance(action, RequestCart):
                await self._request_cart(client, codec.GET, action.request_id, action.has_request_id)
            elif isinstance(action, RelayToSession):
                await self._relay(client, action.message)
            elif isinstance(action, RelayToRoom):
                await self._relay_to_room(client, action.room_id, action.message)
            elif isinstance(action, JoinRoom):
                await self._join_room(client, action)
            elif isinstance(action, LeaveRoom):
                self._leave_room(client, action.room_id)
                for message in action.replies:
                    self.send(client, message)
            elif isinstance(action, Close):
                self.close_after_flush(client, action.code, action.reason)

    # -- sessions --------------------------------------------------------------------------

    async def _join_session(self, client: Client, action: JoinSession) -> None:
        key, first, released = self.hub.join_session(client, action.session_id)
        if released is not None:
            self.ownership.release_later(released)
        self.metrics.sessions_held.set(len(self.hub.sessions))
        if first:
            await self.ownership.claim(key)
        for message in joined_messages(action, len(self.hub.sessions[key])):
            self.send(client, message)
        recovered, client.recovered_seq = client.recovered_seq, 0
        if recovered:
            # A Socket.IO tab back with the offset (seq) of the cart it shows: never sent that
            # cart again, and not even asked for when another tab here has the same newest seq.
            newest = self.hub.newest_seq(key, besides=client)
            client.cart_seq = recovered
            if newest and newest == recovered:
                self.metrics.carts_recovered.inc()
                return
        # Claimed before asking: a change after this point is pushed, one before is in the reply.
        await self._request_cart(client, codec.JOIN, None, False)

    def _leave_session(self, client: Client) -> None:
        released = self.hub.leave_session(client)
        if released is not None:
            self.metrics.sessions_held.set(len(self.hub.sessions))
            self.ownership.release_later(released)

    # -- entity and user rooms -------------------------------------------------------------

    async def _join_room(self, client: Client, action: JoinRoom) -> None:
        first, size = self.hub.join_room(client, action.room_id)
        if first:
            await self.ownership.claim(room_route(action.room_id))
        for message in action.replies:
            if message.get("type") == "room_joined":
                message = {**message, "roomSize": size}
            self.send(client, message)

    def _leave_room(self, client: Client, room: str) -> None:
        if self.hub.leave_room(client, room):
            self.ownership.release_later(room_route(room))

    # -- requests to the fetchers ----------------------------------------------------------

    async def _request_cart(self, client: Client, kind: str, request_id: Any, has_request_id: bool) -> None:
        token = self.pending.add(client, kind, request_id, has_request_id, time.monotonic())
        self.publish_request(kind, client, token)

    def publish_request(self, kind: str, client: Client, token: int) -> None:
        """Queue a cart request; it leaves with the others of this moment (`requests`)."""
        sid = self.hub.session_ids.get(client.session_key or "")
        if sid is not None:
            self.requests.submit_nowait([sid, token, kind])

    async def _publish_requests(self, items: list[list[Any]]) -> None:
        envelope = {"kind": codec.REQUESTS, "gateway": self.id, "items": items}
        try:
            await self.client.publish(self.keys.fetcher_requests_channel, codec.pack(envelope))
        except RedisError as exc:
            # Joins are asked again by the sweep; a get times out with an error reply.
            log.warning("%d cart request(s) not sent (%s)", len(items), exc)

    async def request_refresh(self, session_ids: list[str]) -> None:
        for start in range(0, len(session_ids), REFRESH_BATCH):
            envelope = {
                "kind": codec.REFRESH,
                "gateway": self.id,
                "sids": session_ids[start : start + REFRESH_BATCH],
            }
            await self.client.publish(self.keys.fetcher_requests_channel, codec.pack(envelope))

    async def _sweep_requests(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            for outcome, token, pending in self.pending.due(time.monotonic(), lambda c: c.protocol.closed):
                if outcome == RETRY:
                    self.publish_request(codec.JOIN, pending.client, token)
                    continue
                self.metrics.requests_timed_out.inc()
                if pending.kind == codec.GET:
                    reply: dict[str, Any] = {
                        "type": "partial_applications_response",
                        "data": {"error": True, "status": "error", "message": TIMEOUT_MESSAGE},
                    }
                    if pending.has_request_id:
                        reply["requestId"] = pending.request_id
                    self.send(pending.client, reply)

    # -- relays from a tab to the other tabs of its session or room ------------------------

    async def _relay(self, sender: Client, message: dict[str, Any]) -> None:
        """A tab's session_message, to the other tabs of its session on every gateway."""
        key = sender.session_key
        if key is not None:
            await self._relay_to_others(
                sender, self.hub.session_members(key), key, {"key": key}, stamp(message)
            )

    async def _relay_to_room(self, sender: Client, room: str, message: dict[str, Any]) -> None:
        """A member's room_message, to the *other* members of an entity room on every gateway
        (the co-editing page's presence)."""
        members = self.hub.room_members(room)
        await self._relay_to_others(sender, members, room_route(room), {"room": room}, stamp(message))

    async def _relay_to_others(
        self, sender: Client, members: Iterable[Client], route: str, address: dict[str, str], text: str
    ) -> None:
        for other in members:
            if other is not sender:
                self.enqueue(other, Outgoing(text, "room_message"))
        try:
            owners = [gateway for gateway in await self.registry.owners(route) if gateway != self.id]
            if not owners:
                return
            envelope = codec.pack({"kind": codec.FRAME, **address, "frame": text, "received_at": None})
            async with self.client.pipeline(transaction=False) as pipe:
                for gateway in owners:
                    pipe.publish(self.keys.gateway_channel(gateway), envelope)
                await pipe.execute()
        except RedisError as exc:
            log.warning("relay not sent to other gateways (%s)", exc)

    async def _send_server_pings(self) -> None:
        """Every socket gets a `server_ping` once per interval, a slice of them at a time: the
        whole set at once stopped the event loop for 70-105 ms at 1000 sockets."""
        step = self.settings.server_ping_interval_seconds / PING_SLICES
        while True:
            clients = list(self.clients.values())
            text = stamp({"type": "server_ping", "id": f"ping_{uuid.uuid4().hex[:16]}"})
            frame = Outgoing(text, "server_ping")
            per_slice = -(-len(clients) // PING_SLICES)
            for i in range(PING_SLICES):
                await asyncio.sleep(step)
                for client in clients[i * per_slice : (i + 1) * per_slice]:
                    self.enqueue(client, frame)  # a socket closed meanwhile is detached: skipped


SOCKET_PATHS = frozenset({"/wss", "/wss/", "/"})
# Socket.IO: `/wss/socket.io/` as the frontend connects, `/socket.io/` behind a proxy that strips
# `/wss`. The bundle (`socket.io.js`) is a plain HTTP route under both.
SOCKETIO_PREFIXES = ("/wss/socket.io", "/socket.io")


class SocketsFirst:
    """The gateway's ASGI entry: WebSocket handshakes on the socket paths go straight to
    `Gateway.serve`; everything else (HTTP routes, lifespan) goes to Starlette. Starlette's
    middleware and router each kept a suspended coroutine frame for as long as a socket lived;
    skipping them makes an idle socket smaller (`make bench`, goal 4)."""

    def __init__(self, app: Starlette, gateway: Gateway) -> None:
        self.app, self.gateway, self.state = app, gateway, app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket" and path in SOCKET_PATHS:
            await websocket_transport.serve(self.gateway, WebSocket(scope, receive, send))
        elif scope["type"] in ("http", "websocket") and _is_engine_path(path):
            await self.gateway.engine(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _is_engine_path(path: str) -> bool:
    return any(path in (prefix, prefix + "/") for prefix in SOCKETIO_PREFIXES)


def create_app(settings: GatewaySettings) -> SocketsFirst:
    gateway = Gateway(settings)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    def ready() -> dict[str, bool]:
        return {
            "redis_subscription": gateway.subscription.healthy,
            "not_draining": not gateway.draining,
            "background_tasks": gateway.failure is None,
        }

    async def client_js(request: Request) -> Response:
        # A public static module; CORS so that a page on the booking site's origin can import it.
        return FileResponse(
            CLIENT_JS,
            media_type="text/javascript",
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=300"},
        )

    async def socketio_bundle(request: Request) -> Response:
        # The official socket.io-client browser bundle, fetched from npm and checked against
        # its published integrity hash at install time (`services/gateway/vendor.py`).
        if not SOCKETIO_BUNDLE.is_file():
            return Response(f"{BUNDLE_MISSING}\n", 404, media_type="text/plain")
        return FileResponse(
            SOCKETIO_BUNDLE,
            media_type="text/javascript",
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=3600"},
        )

    routes = [
        Route("/wss/client.js", client_js),
        Route("/client.js", client_js),
        Route("/wss/socket.io/socket.io.js", socketio_bundle),
        Route("/socket.io/socket.io.js", socketio_bundle),
        *health_routes(ready, gateway.metrics.registry, lambda: gateway.failure),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    return SocketsFirst(app, gateway)
