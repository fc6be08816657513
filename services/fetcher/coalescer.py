"""Per-session coalescing of fetch work (and ordered room deliveries), run in batches, with
bounded concurrency.

Guarantees:
  * at most one fetch per session runs at a time (so a session's snapshots are read, numbered
    and published in order by this process);
  * work submitted while that session's fetch runs is merged into exactly one follow-up fetch,
    which starts after the running one ends: never zero (the last change always reaches the
    tabs), never one per trigger;
  * at most `concurrency` batches run at once, whatever the burst (bounded DB and Redis use);
  * work that raises is handed to `on_failed` (which retries it), never dropped.

Batching (a batch is read in one SQL statement and one Redis call, `service.Fetcher`): a
worker takes every session that is ready, up to `batch_max`. A lone trigger on an idle fetcher
runs at once; while half the workers or more are busy (a burst), a worker first waits
`window` seconds for more to arrive. This is Centrifugo's batching (up to 50, at most 50 ms) adapted to
load: the wait is paid only when there is a queue to amortise it over.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from shared.envelopes import GET, JOIN

log = logging.getLogger(__name__)

__all__ = ["GET", "JOIN", "MAX_QUEUED_EVENTS", "MAX_QUEUED_EVENT_BYTES", "SessionWork", "WorkCoalescer"]

# What one lane (a session, a room) may hold of events while it waits; beyond, the oldest go.
MAX_QUEUED_EVENTS = 100
MAX_QUEUED_EVENT_BYTES = 4 * 1024 * 1024


@dataclass(slots=True)
class SessionWork:
    """What one fetch of a session must deliver."""

    session_id: str  # "" for room and broadcast work
    push_all: bool = False  # a trigger: push to every tab on every owning gateway
    refresh_gateways: set[str] = field(default_factory=set)  # push to all tabs on these
    requests: list[tuple[str, int, str]] = field(default_factory=list)  # (gateway, token, GET|JOIN)
    events: list[str] = field(default_factory=list)  # events for the tabs (JSON texts), in order
    received_at: float | None = None  # wall-clock arrival of the oldest trigger merged in
    attempt: int = 0  # retries after database errors
    route: str | None = None  # a `room:` route or the broadcast: events only, no cart
    dropped: int = 0  # events left out because the queue of this lane was full (oldest first)

    def _bound_events(self) -> None:
        """Keep the newest events within MAX_QUEUED_EVENTS and MAX_QUEUED_EVENT_BYTES: while a
        lane waits (its previous fetch still running, the database slow), events merge into its
        work, and 40 events of 1000 KiB became one 36 MiB publish; Redis disconnected the
        gateway's subscription (`client-output-buffer-limit pubsub 32mb`) and every event for
        that gateway was lost until it resubscribed. An event is news, a cart is state: the
        oldest events go first, never the cart."""
        size = sum(len(text) for text in self.events)
        while self.events and (len(self.events) > MAX_QUEUED_EVENTS or size > MAX_QUEUED_EVENT_BYTES):
            size -= len(self.events.pop(0))
            self.dropped += 1

    @property
    def lane(self) -> str:
        """What work is serialised and merged by: the session id, or the room route."""
        return self.route or self.session_id

    def merge(self, other: SessionWork) -> None:
        self.push_all = self.push_all or other.push_all
        self.refresh_gateways |= other.refresh_gateways
        self.requests.extend(other.requests)
        self.events.extend(other.events)
        self.dropped += other.dropped
        self._bound_events()
        if other.received_at is not None:
            self.received_at = min(self.received_at or other.received_at, other.received_at)
        self.attempt = max(self.attempt, other.attempt)


class WorkCoalescer:
    def __init__(
        self,
        run: Callable[[list[SessionWork]], Awaitable[None]],
        *,
        concurrency: int,
        batch_max: int = 1,
        window: float = 0.0,
        on_coalesced: Callable[[], None] | None = None,
        on_failed: Callable[[SessionWork, Exception], None] | None = None,
    ) -> None:
        self._run = run
        self._concurrency = concurrency
        self._batch_max = batch_max
        self._window = window
        self._in_flight = 0  # batches running
        self._on_coalesced = on_coalesced
        self._on_failed = on_failed
        self._pending: dict[str, SessionWork] = {}  # merged work waiting to run
        self._running: set[str] = set()
        self._ready: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._idle = asyncio.Event()
        self._idle.set()

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._work()) for _ in range(self._concurrency)]

    async def stop(self) -> None:
        for worker in self._workers:
            worker.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers = []

    def submit(self, work: SessionWork) -> None:
        sid = work.lane
        self._idle.clear()
        pending = self._pending.get(sid)
        if pending is not None:
            pending.merge(work)
            if self._on_coalesced is not None:
                self._on_coalesced()
            return
        self._pending[sid] = work
        if sid not in self._running:  # else: queued when the running fetch ends
            self._ready.put_nowait(sid)

    def __len__(self) -> int:
        """Sessions waiting for or in a fetch."""
        return len(self._running) + len(self._pending)

    def busy_lanes(self) -> Iterator[str]:
        yield from self._running
        yield from self._pending

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def _loaded(self) -> bool:
        """Half the workers or more busy: a burst, where a short wait buys a fuller batch. Below
        that (a steady trickle) work starts at once: the window would only add latency."""
        return self._batch_max > 1 and self._in_flight >= max(1, self._concurrency // 2)

    async def _work(self) -> None:
        while True:
            sids = [await self._ready.get()]
            if self._loaded() and self._ready.qsize() < self._batch_max:
                await asyncio.sleep(self._window)  # a burst: let the batch fill
            while len(sids) < self._batch_max and not self._ready.empty():
                sids.append(self._ready.get_nowait())
            works = [self._pending.pop(sid) for sid in sids]
            self._running.update(sids)
            self._in_flight += 1
            try:
                await self._run(works)
            except Exception as exc:
                for work in works:
                    if self._on_failed is None:
                        log.exception("fetch work failed")
                        break
                    try:
                        self._on_failed(work, exc)
                    except Exception:
                        log.exception("fetch work failed, and so did its failure handler")
            finally:
                self._in_flight -= 1
                for sid in sids:
                    self._running.discard(sid)
                    if sid in self._pending:
                        self._ready.put_nowait(sid)
                if not self._running and not self._pending:
                    self._idle.set()
