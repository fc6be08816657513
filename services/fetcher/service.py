"""The fetcher process: subscriptions, shard leases, fetch workers and publishing.

Flow: a trigger (or a gateway request) for a session in one of our shards becomes `SessionWork`
in the coalescer; a worker takes a batch of ready sessions and, for the whole batch, makes one
Redis call for owners, `seq` and snapshots (`cartstate`), one SQL statement for the carts that
must be read, and one pipeline that stores the fresh snapshots and publishes one message per
gateway (`deliveries.plan_*`, batched).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.codec import dumps
from shared.envelopes import (
    CartRequests,
    EnvelopeError,
    Event,
    Refresh,
    Resync,
    decode_for_fetchers,
)
from shared.keys import NOTIFICATIONS_CHANNEL, ROOM_MESSAGES_CHANNEL, SESSION_MESSAGES_CHANNEL, Keys
from shared.metrics import FetcherMetrics
from shared.protocol import (
    BROADCAST_ROUTE,
    mask_session_id,
    now_iso,
    session_hash,
    shard_of,
)
from shared.redis_topology import RedisTopology
from shared.registry import RedisOwnershipRegistry
from shared.settings import FetcherSettings
from shared.subscription import Subscriptions
from shared.supervision import supervise

from .cartstate import CACHED_OR_NEW, NEW, NONE, PUSH, CartSnapshot, CartState
from .coalescer import SessionWork, WorkCoalescer
from .publisher import Publisher
from .routing import GatewayMessages, route_cart, route_room_event, route_session_event
from .shards import ShardLeases
from .shutdown import IN_FLIGHT_SECONDS, RELEASE_SECONDS
from .store import CartStore, CartStoreError
from .triggers import (
    UPDATE_PARTIAL_APPLICATIONS,
    InvalidInput,
    Routed,
    parse_notification,
    parse_room_message,
    parse_session_message,
)

log = logging.getLogger(__name__)

# The key only has to outlive a burst of fetches: the floor (Redis clock in µs) keeps seq
# increasing after it expires. Short, so a made-up session id costs nothing for long.
SEQ_TTL_MS = 15 * 60 * 1000
DB_ERROR_MESSAGE = "Could not load partial applications; please try again"
SHAPE_ERROR_MESSAGE = "Could not read partial applications; please try again later"
# Back-off of a retried session (after an error cart, or work that failed), seconds; the last
# value repeats for as long as a gateway holds the session: no give-up while tabs show an error.
RETRY_DELAYS = (1, 2, 4, 8, 15, 30)


class Fetcher:
    def __init__(
        self,
        settings: FetcherSettings,
        store: CartStore,
        *,
        redis: aioredis.Redis | None = None,
        metrics: FetcherMetrics | None = None,
    ) -> None:
        self.settings = settings
        self.topology = RedisTopology(settings.redis)
        self.keys = Keys(settings.redis.prefix, self.topology.key_groups)
        self.metrics = metrics or FetcherMetrics()
        self.store = store
        self.redis = redis or self.topology.command_client(max_connections=settings.fetch_concurrency * 2 + 8)
        self.direct = self.topology.direct_commands()  # the hot path's lean connection (not in a Cluster)
        self.registry = RedisOwnershipRegistry(self.redis, self.keys, "", 1)
        self.cart_state = CartState(
            self.redis,
            self.keys,
            seq_ttl_ms=SEQ_TTL_MS,
            snapshot_ttl_ms=int(settings.cart_snapshot_ttl_seconds * 1000),
            direct=self.direct,
        )
        self.publisher = Publisher(
            self.topology, self.redis, self.direct, self.keys, self.cart_state, self.metrics
        )
        self.coalescer = WorkCoalescer(
            self._run_batch,
            concurrency=settings.fetch_concurrency,
            batch_max=settings.fetch_batch_max,
            window=settings.fetch_batch_window_seconds,
            on_coalesced=self.metrics.triggers_coalesced.inc,
            on_failed=self._on_work_failed,
        )
        self.leases = ShardLeases(
            self.redis,
            self.keys,
            settings.fetcher_id,
            shards=settings.shards,
            ttl_seconds=settings.lease_ttl_seconds,
            on_gained=self._announce_resync,
            before_release=self._drain_shards,
            on_lapsed=self._announce_resync,
            healthy=lambda: self.db_ok,
            publish_marker=lambda marker: self.redis.publish(self.keys.handover_channel, marker),
            replay=self._replay,
        )
        self.subscription = Subscriptions(
            self.topology,
            self.redis,
            own=[self.keys.fetcher_requests_channel],
            # The hand-over markers with the PHP backend's channels, on one connection: in order.
            plain=[
                SESSION_MESSAGES_CHANNEL,
                NOTIFICATIONS_CHANNEL,
                ROOM_MESSAGES_CHANNEL,
                self.keys.handover_channel,
            ],
            on_message=self._dispatch,
            on_connected=self._on_subscribed,
            name=f"fetcher {settings.fetcher_id}",
            on_state=lambda up: self.metrics.redis_subscription_up.set(1 if up else 0),
            on_deaf=self.metrics.redis_deaf.inc,
        )
        self.db_ok = False
        self.stopping = False
        self.failure: str | None = None  # set when an essential background loop died
        self.metrics.redis_last_message_age.set_function(lambda: self.subscription.last_message_age)
        self.metrics.work_pending.set_function(lambda: len(self.coalescer))
        self.metrics.shards_held.set_function(lambda: len(self.leases.held()))
        self.metrics.shards_configured.set(settings.shards)
        self.metrics.shards_agree.set_function(lambda: 1 if self.leases.mismatch is None else 0)
        self._tasks: list[asyncio.Task[None]] = []
        # One pending retry per session (or route), merged: bounded by the sessions held.
        self._retries: dict[str, tuple[SessionWork, asyncio.TimerHandle]] = {}
        self._errored: dict[str, int] = {}  # session id -> retries so far, while its tabs show an error

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        await self.topology.connect()
        try:
            await self.cart_state.load_commit_script()
        except RedisError as exc:  # Redis down at start: loaded after the first failed commit
            log.warning("could not load the snapshot script yet (%s)", exc)
        self.coalescer.start()
        loops = [
            *self.subscription.loops(),
            *self.topology.loops(self.redis),
            ("leases", self.leases.run()),
            ("db-check", self._watch_database()),
        ]
        self._tasks = [asyncio.create_task(loop, name=name) for name, loop in loops]
        for task in self._tasks:
            supervise(task, self._on_loop_died)
        log.info("fetcher %s started: %r", self.settings.fetcher_id, self.settings)

    def _on_loop_died(self, what: str) -> None:
        """A dead subscription, lease or database loop would leave this process holding shards
        it cannot serve: fail liveness, and hand the shards to the other fetchers now."""
        if self.failure is not None:
            return
        self.failure = f"background task died: {what}"
        task = asyncio.get_running_loop().create_task(self.leases.stop(), name="release-after-death")
        self._tasks.append(task)

    async def stop(self) -> None:
        """Hand the shards over at a marker, finish what is in flight, stop (`shutdown.py` has
        the order and the durations)."""
        self.stopping = True
        for _work, handle in self._retries.values():
            handle.cancel()
        try:
            await asyncio.wait_for(self.leases.stop(), RELEASE_SECONDS)
        except TimeoutError:
            log.warning("fetcher: shard leases not released within %.0fs; they expire", RELEASE_SECONDS)
        self.subscription.stop()
        try:
            await asyncio.wait_for(self.coalescer.wait_idle(), IN_FLIGHT_SECONDS)
        except TimeoutError:
            log.warning("fetcher: in-flight work did not finish within %.0fs", IN_FLIGHT_SECONDS)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.coalescer.stop()
        await self.redis.aclose()
        await self.topology.aclose()

    @property
    def ready(self) -> bool:
        return (
            self.subscription.healthy
            and self.topology.commands_healthy
            and self.db_ok
            and self.leases.mismatch is None
            and not self.stopping
            and self.failure is None
        )

    async def _watch_database(self) -> None:
        """Every 5 s: can the cart query run (the database answers *and* has the Portico
        tables)? Logs each transition once; when the database comes back, every session whose
        tabs were last sent an error is fetched again at once."""
        first = True
        while True:
            try:
                problem = await self.store.check()
            except Exception as exc:  # check() handles the expected errors; never let this loop die
                log.exception("database check failed unexpectedly")
                problem = f"{exc.__class__.__name__}"
            ok = problem is None
            if ok != self.db_ok or (first and not ok):
                if ok:
                    log.info("database: available%s", "" if first else " again")
                    self._retry_errored_now()
                else:
                    log.error("database: cannot serve carts (%s)", problem)
            self.db_ok, first = ok, False
            self.metrics.db_up.set(1 if ok else 0)
            await asyncio.sleep(5)

    # -- inputs ----------------------------------------------------------------------------

    async def _on_subscribed(self) -> None:
        # A hand-over marker may have passed while we were not subscribed: stop waiting for it.
        await self.leases.serve_overdue(all_awaited=True, announce=False)
        # Triggers published while we were deaf are lost: have the gateways ask again.
        held = self.leases.held()
        if held:
            await self._announce_resync(held)

    def _dispatch(self, channel: str, data: bytes) -> None:
        """One message, as the subscription reads it, in order (the hand-over cut relies on it:
        nothing here awaits)."""
        if channel == SESSION_MESSAGES_CHANNEL:
            self._on_trigger(data)
        elif channel == NOTIFICATIONS_CHANNEL:
            self._on_routed(channel, data, parse_notification)
        elif channel == ROOM_MESSAGES_CHANNEL:
            self._on_routed(channel, data, parse_room_message)
        elif channel == self.keys.handover_channel:
            self.leases.handovers.on_marker(data)
        else:
            self._on_request(data)

    def _replay(self, messages: list[tuple[str, bytes]]) -> None:
        """What came after a hand-over marker, before this fetcher served the shard."""
        self.metrics.handover_replayed.inc(len(messages))
        for channel, data in messages:
            self._dispatch(channel, data)

    def _serves(self, session_id: str, message: tuple[str, bytes] | None = None) -> bool:
        return self._serves_route(session_hash(session_id), message)

    def _serves_route(self, route: str, message: tuple[str, bytes] | None = None) -> bool:
        """Whether this fetcher serves the route's shard now. A message of the PHP backend for a
        shard it does not serve is kept if that shard is changing hands (`handover.py`)."""
        shard = shard_of(route, self.settings.shards)
        if self.leases.owns(shard):
            return True
        self.metrics.triggers_other_shard.inc()
        if message is not None:
            self.leases.handovers.keep(shard, message)
        return False

    def _on_routed(self, channel: str, data: bytes, parse: Callable[[bytes, int], Routed]) -> None:
        received_at = time.time()
        try:
            routed = parse(data, self.settings.max_payload_bytes)
        except InvalidInput as exc:
            self.metrics.triggers_invalid.labels(exc.reason).inc()
            log.warning("%s: dropped invalid payload (%s)", channel, exc)
            return
        if not self._serves_route(routed.route, (channel, data)):
            return
        self.metrics.triggers.labels(channel).inc()
        if routed.session_id is not None:
            work = SessionWork(routed.session_id, events=[routed.text], received_at=received_at)
        else:
            work = SessionWork("", events=[routed.text], received_at=received_at, route=routed.route)
        self.coalescer.submit(work)

    def _on_trigger(self, data: bytes) -> None:
        received_at = time.time()
        try:
            trigger = parse_session_message(data, self.settings.max_payload_bytes)
        except InvalidInput as exc:
            self.metrics.triggers_invalid.labels(exc.reason).inc()
            log.warning("session_messages: dropped invalid payload (%s)", exc)
            return
        if not self._serves(trigger.session_id, (SESSION_MESSAGES_CHANNEL, data)):
            return
        self.metrics.triggers.labels(trigger.type).inc()
        if trigger.type == UPDATE_PARTIAL_APPLICATIONS:
            self.coalescer.submit(SessionWork(trigger.session_id, push_all=True, received_at=received_at))
        else:
            # Routed through the coalescer too: ordered per session, bounded concurrency.
            assert trigger.event is not None
            self.coalescer.submit(
                SessionWork(trigger.session_id, events=[trigger.event], received_at=received_at)
            )

    def _on_request(self, data: bytes) -> None:
        try:
            request, errors = decode_for_fetchers(data)
        except EnvelopeError as exc:
            errors, request = [exc], None
        for error in errors:
            self.metrics.triggers_invalid.labels("bad_request").inc()
            log.warning("fetcher requests: dropped invalid envelope (%s)", error)
        if isinstance(request, CartRequests):
            for item in request.items:
                if self._serves(item.session_id):
                    self.metrics.requests.labels(item.kind).inc()
                    self.coalescer.submit(
                        SessionWork(item.session_id, requests=[(request.gateway, item.token, item.kind)])
                    )
        elif isinstance(request, Refresh):
            for sid in request.session_ids:
                if self._serves(sid):
                    self.metrics.requests.labels("refresh").inc()
                    self.coalescer.submit(SessionWork(sid, refresh_gateways={request.gateway}))

    # -- work ------------------------------------------------------------------------------

    async def _run_batch(self, works: list[SessionWork]) -> None:
        sessions = []
        for work in works:
            if work.dropped:
                self.metrics.events_dropped.inc(work.dropped)
                log.warning(
                    "%s: %d event(s) left out, its queue was full (oldest first)",
                    mask_session_id(work.lane) if not work.route else work.route,
                    work.dropped,
                )
                work.dropped = 0
            if work.route is None:
                sessions.append(work)
                continue
            try:
                await self._deliver_to_route(work)
            except Exception as exc:  # this route only; the sessions of the batch go on
                self._on_work_failed(work, exc)
        if sessions:
            await self._run_sessions(sessions)

    def _mode(self, work: SessionWork) -> str:
        """This work's `cartstate` mode: whether owners are needed, and how the cart is had."""
        owners = "o" if work.push_all or work.events else "-"
        if work.push_all:
            cart = NEW if work.refresh_gateways or work.requests else PUSH
        elif work.refresh_gateways:
            cart = NEW  # a gateway missed pushes: triggers may be lost, the snapshot may be stale
        elif work.requests:
            cart = CACHED_OR_NEW if self.cart_state.snapshots else NEW
        else:
            cart = NONE
        return owners + cart

    async def _run_sessions(self, works: list[SessionWork]) -> None:
        self.metrics.batch_size.observe(len(works))
        hashes = [session_hash(work.session_id) for work in works]
        modes = [self._mode(work) for work in works]
        begun = await self.cart_state.begin(hashes, modes)
        corrupt = [
            i for i, b in enumerate(begun) if modes[i][1] == CACHED_OR_NEW and not b.seq and not b.snapshot
        ]
        if corrupt:  # a snapshot that did not decode: read those carts after all
            again = await self.cart_state.begin([hashes[i] for i in corrupt], ["-" + NEW] * len(corrupt))
            for i, b in zip(corrupt, again, strict=True):
                begun[i] = b

        outgoing = GatewayMessages()
        for work, session, state in zip(works, hashes, begun, strict=True):
            if work.events:
                if not state.owners:
                    self.metrics.triggers_unheld.inc(len(work.events))
                for text in work.events:
                    outgoing.add(route_session_event(session, state.owners, text, work.received_at), "event")

        to_read = [i for i, state in enumerate(begun) if state.seq and state.snapshot is None]
        read = await self._read_carts([works[i].session_id for i in to_read], [begun[i].seq for i in to_read])
        fresh: list[tuple[str, CartSnapshot]] = []
        snapshots: dict[int, CartSnapshot] = {}
        for i, state in enumerate(begun):
            if state.snapshot is not None:
                self.metrics.carts_from_snapshot.inc()
                snapshots[i] = state.snapshot
            elif state.seq:
                snapshots[i] = read[works[i].session_id]
                if snapshots[i].error is None:
                    fresh.append((hashes[i], snapshots[i]))
            elif works[i].push_all:
                self.metrics.triggers_unheld.inc()  # no socket anywhere: nothing to read
                self._errored.pop(works[i].session_id, None)  # no tab anywhere shows its error now
        for i, snapshot in snapshots.items():
            outgoing.add(route_cart(works[i], hashes[i], begun[i].owners, snapshot), "cart")

        # Snapshots before the publishes: a join that follows a push finds its snapshot.
        stored, errors = await self.publisher.commit_and_publish(fresh, outgoing)
        # Every command ran (a pipeline is not a transaction). A snapshot that was not stored
        # only costs a later read; a publish that failed fails the work, which is retried.
        if errors:
            raise errors[0]
        failed = [result for result in stored if isinstance(result, Exception)]
        if failed:
            log.info("cart snapshots not stored (%s); loading the script again", failed[0])
            await self.cart_state.load_commit_script()
        for kind, count in outgoing.counts.items():
            self.metrics.deliveries_published.labels(kind).inc(count)
        for work in works:
            work.events = []  # published: a retry of this work must not send them twice

        for i, snapshot in snapshots.items():
            session_id = works[i].session_id
            if snapshot.error is None:
                self._errored.pop(session_id, None)
            else:
                # Some tab (pushed to, or answered) now shows an error: fetch again until the
                # database answers, and push to every tab, whatever asked this time.
                attempt = self._errored.get(session_id, 0)
                self._errored[session_id] = attempt + 1
                self._retry_later(SessionWork(session_id, push_all=True, attempt=attempt + 1))

    async def _deliver_to_route(self, work: SessionWork) -> None:
        if work.route == BROADCAST_ROUTE:
            # One fetcher publishes it once on the all-gateways channel: every gateway once,
            # every tab once. Each published event leaves the work, so a retry after a failure
            # sends only the rest.
            while work.events:
                event = Event(work.events[0], broadcast=True, received_at=work.received_at)
                await self.publisher.to_every_gateway(event)
                work.events.pop(0)
                self.metrics.deliveries_published.labels("broadcast").inc()
            return
        assert work.route is not None
        owners = await self.registry.owners(work.route)
        if not owners:
            self.metrics.triggers_unheld.inc(len(work.events))
            return
        room = work.route.removeprefix("room:")
        while work.events:
            await self.publisher.events(
                route_room_event(room, owners, work.events[0], work.received_at), "room"
            )
            work.events.pop(0)

    async def _read_carts(self, session_ids: list[str], seqs: list[int]) -> dict[str, CartSnapshot]:
        """The carts as snapshots, in one statement, or error snapshots: for every session when
        the database cannot answer, for one session when its rows cannot be shaped (PostgreSQL
        accepts `'infinity'` timestamps and `'NaN'` numerics, which have no place in JSON)."""
        if not session_ids:
            return {}
        started = time.perf_counter()
        statements_before = self.store.statements
        try:
            carts = await self.store.fetch_carts(session_ids)
        except CartStoreError as exc:
            self.metrics.db_errors.inc()
            log.warning("%d cart(s): database error (%s)", len(session_ids), exc)
            fetched_at = now_iso()
            return {
                sid: CartSnapshot(seq, fetched_at, None, error=DB_ERROR_MESSAGE)
                for sid, seq in zip(session_ids, seqs, strict=True)
            }
        finally:
            self.metrics.fetch_duration.observe(time.perf_counter() - started)
            self.metrics.cart_queries.inc(self.store.statements - statements_before)
            self.metrics.carts_read.inc(len(session_ids))
        fetched_at = now_iso()
        snapshots = {}
        for sid, seq in zip(session_ids, seqs, strict=True):
            cart = carts.get(sid, [])
            try:
                if isinstance(cart, Exception):
                    raise cart
                snapshots[sid] = CartSnapshot(seq, fetched_at, dumps(cart), count=len(cart))
            except CartStoreError as exc:  # read alone after its batch was rejected, and failed
                self.metrics.db_errors.inc()
                log.warning("cart of %s: database error (%s)", mask_session_id(sid), exc)
                snapshots[sid] = CartSnapshot(seq, fetched_at, None, error=DB_ERROR_MESSAGE)
            except Exception as exc:
                self.metrics.carts_unshapeable.inc()
                log.error(
                    "cart of %s: rows cannot be shaped (%s: %s)",
                    mask_session_id(sid),
                    exc.__class__.__name__,
                    exc,
                )
                snapshots[sid] = CartSnapshot(seq, fetched_at, None, error=SHAPE_ERROR_MESSAGE)
        return snapshots

    def _on_work_failed(self, work: SessionWork, exc: Exception) -> None:
        """Work that failed for any reason (Redis gone mid-fetch, a bug) is retried, never
        dropped: after a Redis restart the pooled connections the old server closed failed
        the first fetches, and their triggers were lost."""
        self.metrics.work_failed.inc()
        log.warning(
            "work for %s failed (%s: %s); retrying",
            mask_session_id(work.lane) if not work.route else work.route,
            exc.__class__.__name__,
            exc,
        )
        work.attempt += 1
        self._retry_later(work)

    def _retry_later(self, work: SessionWork) -> None:
        """Submit `work` again after a back-off; merged with a retry already waiting."""
        waiting = self._retries.get(work.lane)
        if waiting is not None:
            waiting[0].merge(work)
            return
        step = min(max(work.attempt, 1), len(RETRY_DELAYS)) - 1
        delay = RETRY_DELAYS[step] * random.uniform(0.8, 1.2)

        def fire() -> None:
            retry, _handle = self._retries.pop(work.lane)
            if not self.stopping:
                self.coalescer.submit(retry)

        handle = asyncio.get_running_loop().call_later(delay, fire)
        self._retries[work.lane] = (work, handle)

    def _retry_errored_now(self) -> None:
        """The database is back: every session whose tabs show an error is fetched now."""
        for session_id, attempt in list(self._errored.items()):
            waiting = self._retries.pop(session_id, None)
            if waiting is not None:
                waiting[1].cancel()
                self.coalescer.submit(waiting[0])
            else:
                self.coalescer.submit(SessionWork(session_id, push_all=True, attempt=attempt))

    # -- shard hand-over -------------------------------------------------------------------

    async def _announce_resync(self, shards: list[int]) -> None:
        await self.publisher.to_every_gateway(Resync(shards, self.settings.shards))

    def _shard_of_work(self, lane: str) -> int:
        """The shard of a coalescer lane: a `room:` route, or a session id."""
        return shard_of(lane if lane.startswith("room:") else session_hash(lane), self.settings.shards)

    async def _drain_shards(self, shards: list[int]) -> None:
        """Before a lease is freed: let running fetches of those shards publish (bounded)."""
        released = set(shards)
        deadline = time.monotonic() + self.settings.lease_ttl_seconds / 2
        while time.monotonic() < deadline:
            busy = [lane for lane in self.coalescer.busy_lanes() if self._shard_of_work(lane) in released]
            if not busy:
                return
            await asyncio.sleep(0.05)
