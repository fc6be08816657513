"""Redis pub/sub: a subscription that never dies silently.

Delivery guarantee of Redis pub/sub, and so of `Subscription`: at most once, in publish order per
publishing connection, and only while connected. Whatever is published while the subscription is
down is lost; therefore every (re)subscribe runs `on_connected`, where the owner resynchronises
(the gateway re-registers its sessions and asks for fresh carts, the fetcher re-announces its
shards).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from shared.redis_clients import parser_options

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], Awaitable[None]]
ConnectedHandler = Callable[[], Awaitable[None]]


class Subscription:
    """Keeps one pub/sub connection subscribed to `channels` until `stop()`.

    * redis-py's own reconnect is disabled (retries=0): it would resubscribe silently and hide
      the gap; here every failure is logged, `live` turns False, and the loop reconnects with
      full-jitter exponential back-off, then runs `on_connected`.
    * No socket timeout (redis-py 8 defaults to 5 s, which kills idle subscribers); instead a
      PING on the pub/sub connection every `probe_interval` proves the link: silence for
      `stale_after` seconds counts as a dead connection.
    * A handler that raises is logged and the message dropped; the loop goes on.
    """

    def __init__(
        self,
        url: str,
        channels: Sequence[str],
        on_message: MessageHandler,
        on_connected: ConnectedHandler,
        *,
        name: str,
        probe_interval: float = 5.0,
        stale_after: float = 15.0,
        backoff_base: float = 0.2,
        backoff_cap: float = 5.0,
        on_state: Callable[[bool], None] | None = None,
    ) -> None:
        self._url = url
        self._channels = list(channels)
        self._on_message = on_message
        self._on_connected = on_connected
        self._name = name
        self._probe_interval = probe_interval
        self._stale_after = stale_after
        self._backoff_base = backoff_base
        self._backoff_cap = backoff_cap
        self._on_state = on_state
        self._stopping = asyncio.Event()
        self.live = False
        self.last_message_at: float | None = None  # monotonic time of the last message or pong
        self.reconnects = 0

    def _set_live(self, live: bool) -> None:
        if self.live != live:
            self.live = live
            if self._on_state is not None:
                self._on_state(live)

    def stop(self) -> None:
        self._stopping.set()

    @property
    def last_message_age(self) -> float:
        """Seconds since the last message or pong on the connection (inf before the first)."""
        if self.last_message_at is None:
            return float("inf")
        return time.monotonic() - self.last_message_at

    @property
    def healthy(self) -> bool:
        """Subscribed, and heard from Redis recently (a pong at least every probe interval)."""
        return self.live and self.last_message_age <= self._stale_after

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

    async def _run_once(self) -> None:
        client = aioredis.Redis.from_url(
            self._url,
            socket_connect_timeout=5,
            socket_timeout=None,
            socket_keepalive=True,
            retry=Retry(NoBackoff(), 0),
            **parser_options(),
        )
        pubsub = client.pubsub()
        try:
            await pubsub.subscribe(*self._channels)
            # The subscription is in place before we resynchronise: anything published from
            # here on is delivered, anything before is covered by on_connected.
            self.last_message_at = time.monotonic()
            self._set_live(True)
            self.reconnects += 1
            log.info("%s: subscribed to %d channel(s)", self._name, len(self._channels))
            await self._on_connected()
            await self._pump(pubsub)
        finally:
            self._set_live(False)
            try:
                await pubsub.aclose()  # type: ignore[no-untyped-call]
                await client.aclose()
            except Exception:  # the connection is already broken; nothing to clean
                pass

    async def _pump(self, pubsub: aioredis.client.PubSub) -> None:
        next_probe = time.monotonic() + self._probe_interval
        while not self._stopping.is_set():
            message = await pubsub.get_message(timeout=min(1.0, self._probe_interval))
            now = time.monotonic()
            if message is not None:
                self.last_message_at = now
                if message["type"] == "message":
                    channel = message["channel"]
                    if isinstance(channel, bytes):
                        channel = channel.decode()
                    try:
                        await self._on_message(channel, message["data"])
                    except Exception:
                        log.exception("%s: handler failed; message dropped", self._name)
            if now >= next_probe:
                await pubsub.ping()
                next_probe = now + self._probe_interval
            assert self.last_message_at is not None
            if now - self.last_message_at > self._stale_after:
                raise TimeoutError(f"no message or pong for {self._stale_after:.0f}s")
