"""Redis pub/sub: subscriptions that never die silently, and never stay deaf.

Delivery guarantee of Redis pub/sub, and so of `Subscription`: at most once, in publish order per
publishing connection, and only while connected. Whatever is published while a subscription is
down is lost; therefore every (re)subscribe runs `on_connected`, where the owner resynchronises
(the gateway re-registers its sessions and asks for fresh carts, the fetcher re-announces its
shards).

`Subscriptions` is what a service holds: its channels on as many connections as the topology
needs (`shared.redis_topology`): one on a single node or through Sentinel; in a Cluster one for
the PHP backend's plain channels and one per sharded channel of the service's own, each on the
primary of its slot, each its own loop (one reader for every node let one sick node stall them
all).
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from shared.redis_topology import CONNECT_TIMEOUT, RedisTopology
from shared.resp import Moved, PubSubConnection

log = logging.getLogger(__name__)

# A message's handler runs as the message is read; one that must wait (a full outbox) returns an
# awaitable, and reading pauses until it is done.
MessageHandler = Callable[[str, bytes], Awaitable[None] | None]
ConnectedHandler = Callable[[], Awaitable[None]]
PROBE = b"\x00portico-probe\x00"
TRAIL_SECONDS = 30.0  # at most, listening to an old master after Sentinel's switch (`_trail`)


class Deaf(RedisError):
    """The connection answers pings, but what is published does not come back (a demoted
    master, a moved slot): reconnect, and resolve the node again."""


class Switched(Moved):
    """Sentinel named a new master: reconnect there, and trail the old one (`_trail`)."""


Publish = Callable[[str, bytes], Awaitable[Any]]


class Subscription:
    """Keeps one pub/sub connection subscribed to `channels` until `stop()`.

    * Every failure is logged, `live` turns False, and the loop reconnects with full-jitter
      exponential back-off, resolving its node again, then runs `on_connected` (redis-py's own
      silent resubscribe would have hidden the gap).
    * The connection (`shared.resp`) hands each message to `on_message` as it is
      read; a handler that returns an awaitable pauses reading until it is done.
    * No socket timeout (redis-py 8's 5 s default killed idle subscribers); instead a PING every
      `probe_interval` proves the link, and silence for `stale_after` seconds counts as a dead
      connection.
    * A **delivery probe** every `probe_interval`: published on a new connection resolved as a
      new subscriber's would be (where publishes go now) to a channel this connection listens
      on. One that does not come back within `probe_timeout` means the subscription is deaf:
      connected, answering pings, but not where publishes go (a primary demoted without its
      clients being dropped, behind one endpoint; Sentinel's old master before its demotion:
      centrifugo#1189). It turns not healthy, reconnects and resolves its node again. Sent even
      while messages flow: stale publishers may still feed the old node, so traffic proves
      nothing. A probe that could not be *sent* (Redis unreachable) is no verdict.
    * `sharded`: SSUBSCRIBE (a Cluster's sharded pub/sub); a server-side `sunsubscribe` (its
      slot moved) reconnects to the slot's new owner.
    * A handler that raises is logged and the message dropped; the loop goes on.
    """

    def __init__(
        self,
        topology: RedisTopology,
        channels: Sequence[str],
        on_message: MessageHandler,
        on_connected: ConnectedHandler,
        *,
        name: str,
        publish: Publish | None = None,
        sharded: bool = False,
        probe_interval: float = 5.0,
        probe_timeout: float = 3.0,
        stale_after: float = 15.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        on_state: Callable[[bool], None] | None = None,
        on_deaf: Callable[[], None] | None = None,
    ) -> None:
        self._topology = topology
        self._channels = list(channels)
        self._on_message = on_message
        self._on_connected = on_connected
        self._name = name
        self._publish = publish
        self._sharded = sharded
        # The probe's channel is this connection's own; for a sharded one, in the same slot
        # as its first channel (whose name is the probe channel's hash tag).
        tag = os.urandom(6).hex()
        first = self._channels[0]
        self.probe_channel = f"{{{first}}}:probe:{tag}" if sharded else f"{first}:probe:{tag}"
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._stale_after = stale_after
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._on_state = on_state
        self._on_deaf = on_deaf
        self._stopping = asyncio.Event()
        self._restart = asyncio.Event()
        self._probe_back = False  # the probe in flight came back
        self.live = False
        self.deaf = False  # a probe did not come back: not healthy until subscribed again
        self.resynced = False  # on_connected finished on the current connection
        self.last_message_at: float | None = None  # monotonic time of the last message or pong
        self.reconnects = 0
        self.deaf_detected = 0
        self._trailing: set[asyncio.Task[None]] = set()
        self._connection: PubSubConnection | None = None

    def _set_live(self, live: bool) -> None:
        if self.live != live:
            self.live = live
            if self._on_state is not None:
                self._on_state(live)

    def stop(self) -> None:
        self._stopping.set()

    def restart(self) -> None:
        """Reconnect now to the master Sentinel announced, trailing the old one."""
        self._restart.set()

    @property
    def last_message_age(self) -> float:
        """Seconds since the last message or pong on the connection (inf before the first)."""
        connection = self._connection
        if connection is not None and self.live:
            self.last_message_at = connection.last_heard
        if self.last_message_at is None:
            return float("inf")
        return time.monotonic() - self.last_message_at

    @property
    def healthy(self) -> bool:
        """Subscribed and resynchronised (`on_connected` done: a gateway ready before it claimed
        its sessions again was missed by the fetchers' pushes), heard from Redis recently (a
        pong at least every probe interval), and not found deaf by a probe."""
        return self.live and self.resynced and not self.deaf and self.last_message_age <= self._stale_after

    async def run(self) -> None:
        failures = 0
        while not self._stopping.is_set():
            try:
                await self._run_once()
                failures = 0
            except (RedisError, OSError, TimeoutError) as exc:
                self._set_live(False)
                failures += 1
                delay = random.uniform(0, min(self._backoff_cap, self._backoff_base * 2**failures))
                if isinstance(exc, Moved):
                    delay = 0.0  # nothing is broken: the node to listen on changed
                log.warning(
                    "%s: subscription lost (%s: %s); reconnecting in %.2fs",
                    self._name,
                    exc.__class__.__name__,
                    exc,
                    delay,
                )
                try:
                    await asyncio.wait_for(self._stopping.wait(), delay)
                except TimeoutError:
                    pass
        self._set_live(False)

    def _deliver(self, channel: str, data: bytes) -> Awaitable[None] | None:
        """A message as the connection reads it (see `MessageHandler`)."""
        if channel == self.probe_channel:
            self._probe_back = True
            return None
        try:
            pending = self._on_message(channel, data)
        except Exception:
            log.exception("%s: handler failed; message dropped", self._name)
            return None
        return pending

    async def _run_once(self) -> None:
        self._restart.clear()
        self.resynced = False
        address = await self._topology.subscriber_address(self._channels[0])
        connection = await PubSubConnection.open(
            address, self._deliver, sharded=self._sharded, timeout=CONNECT_TIMEOUT
        )
        trailing = False
        try:
            channels = [*self._channels, self.probe_channel]
            await asyncio.wait_for(connection.subscribe(channels), CONNECT_TIMEOUT)
            # The subscription is in place before we resynchronise: anything published from
            # here on is delivered, anything before is covered by on_connected.
            self._connection = connection
            self.last_message_at = time.monotonic()
            self.deaf = False
            self._set_live(True)
            self.reconnects += 1
            log.info("%s: subscribed to %d channel(s)", self._name, len(self._channels))
            await self._on_connected()
            self.resynced = True
            await self._watch(connection)
        except Switched:
            trailing = True
            self._trail(connection)
            raise
        finally:
            self._connection = None
            self._set_live(False)
            if not trailing:
                connection.close()

    async def _watch(self, connection: PubSubConnection) -> None:
        """Wake every second or so: pings, probes, staleness; and end with the connection."""
        now = time.monotonic()
        next_ping = next_probe = now + self._probe_interval
        probe: asyncio.Task[Any] | None = None  # the publish of the probe in flight
        probe_sent: float | None = None  # when the probe awaited back was sent
        try:
            while not self._stopping.is_set():
                if self._restart.is_set():
                    raise Switched("Sentinel switched masters")
                done, _ = await asyncio.wait({connection.closed}, timeout=min(1.0, self._probe_interval))
                if done:
                    raise connection.closed.result() or RedisConnectionError("connection closed")
                now = time.monotonic()
                self.last_message_at = connection.last_heard
                if self._probe_back:
                    probe_sent, self._probe_back = None, False
                if now >= next_ping:
                    connection.ping()
                    next_ping = now + self._probe_interval
                if self._publish is not None and probe_sent is None and now >= next_probe:
                    probe_sent, next_probe = now, now + self._probe_interval
                    self._probe_back = False
                    probe = asyncio.ensure_future(
                        asyncio.wait_for(self._publish(self.probe_channel, PROBE), self._probe_timeout)
                    )
                    probe.add_done_callback(_retrieve)
                if probe_sent is not None and now - probe_sent > self._probe_timeout:
                    if probe is not None and probe.done() and probe.exception() is None:
                        self.deaf = True
                        self.deaf_detected += 1
                        if self._on_deaf is not None:
                            self._on_deaf()
                        raise Deaf(f"a delivery probe did not come back within {self._probe_timeout:.0f}s")
                    probe_sent = None  # not sent (Redis unreachable): the pings judge the connection
                if now - self.last_message_at > self._stale_after:
                    raise TimeoutError(f"no message or pong for {self._stale_after:.0f}s")
        finally:
            if probe is not None and not probe.done():
                probe.cancel()

    def _trail(self, connection: PubSubConnection) -> None:
        """Sentinel switched masters: the old one keeps taking PUBLISH until Sentinel demotes it
        (about 10 s; it then drops its clients), and a publisher that has not switched yet (the
        PHP backend on a kept connection) still publishes there. Keep listening to it, beside
        the new subscription, until it drops us or `TRAIL_SECONDS` pass: a trigger published on
        the old master in that window was lost otherwise (seen in the chaos suite: tabs left on
        an older cart). Its messages keep going to the handler as they arrive."""

        async def trail() -> None:
            try:
                await asyncio.wait_for(asyncio.shield(connection.closed), TRAIL_SECONDS)
                log.info("%s: the old master is demoted or gone", self._name)
            except TimeoutError:
                pass
            finally:
                connection.close()

        task = asyncio.get_running_loop().create_task(trail(), name=f"{self._name} trailing")
        self._trailing.add(task)
        task.add_done_callback(self._trailing.discard)


def _retrieve(task: asyncio.Task[Any]) -> None:
    """A probe's failure is read where it matters (`_pump`); never 'never retrieved'."""
    if not task.cancelled():
        task.exception()


class Subscriptions:
    """A service's channels, on the connections its topology needs (see the module docstring).

    `own` are the service's own channels (sharded in a Cluster, one connection each, since one
    SSUBSCRIBE takes channels of one slot only); `plain` are the PHP backend's (plain pub/sub
    everywhere). Everything else is `Subscription`'s, per connection; this one is live and
    healthy when every connection is."""

    def __init__(
        self,
        topology: RedisTopology,
        redis: Any,
        *,
        own: Sequence[str],
        plain: Sequence[str] = (),
        on_message: MessageHandler,
        on_connected: ConnectedHandler,
        name: str,
        on_state: Callable[[bool], None] | None = None,
        **options: Any,
    ) -> None:
        self._on_state = on_state
        self._on_deaf = options.pop("on_deaf", None)
        self._resets: set[asyncio.Task[None]] = set()

        def deaf() -> None:
            # The commands may be on the same wrong node: let them connect again too.
            task = asyncio.get_running_loop().create_task(topology.reset_commands())
            self._resets.add(task)
            task.add_done_callback(self._resets.discard)
            if self._on_deaf is not None:
                self._on_deaf()

        def make(channels: Sequence[str], sharded: bool, label: str) -> Subscription:
            def publish(channel: str, message: bytes) -> Awaitable[Any]:
                return topology.publish_probe(channel, message, sharded=sharded)

            return Subscription(
                topology,
                channels,
                on_message,
                on_connected,
                name=f"{name}{label}",
                publish=publish,
                sharded=sharded,
                on_state=self._state_changed,
                on_deaf=deaf,
                **options,
            )

        if topology.sharded:
            self.parts = [make([channel], True, f" [{channel}]") for channel in own]
            if plain:
                self.parts.append(make(plain, False, ""))
        else:
            self.parts = [make([*own, *plain], False, "")]
        topology.on_switch(self.restart)

    def _state_changed(self, _up: bool) -> None:
        if self._on_state is not None:
            self._on_state(self.live)

    def loops(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        return [(f"subscription-{n}", part.run()) for n, part in enumerate(self.parts)]

    def stop(self) -> None:
        for part in self.parts:
            part.stop()

    def restart(self) -> None:
        for part in self.parts:
            part.restart()

    @property
    def live(self) -> bool:
        return all(part.live for part in self.parts)

    @property
    def healthy(self) -> bool:
        return all(part.healthy for part in self.parts)

    @property
    def last_message_age(self) -> float:
        return max(part.last_message_age for part in self.parts)

    @property
    def reconnects(self) -> int:
        return sum(part.reconnects for part in self.parts)

    @property
    def deaf_detected(self) -> int:
        return sum(part.deaf_detected for part in self.parts)
