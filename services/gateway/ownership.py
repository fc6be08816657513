"""What this gateway holds, as Redis knows it: claims, releases and the liveness heartbeat.

The fetchers publish a session's cart to the gateways that *own* its route (`shared.registry`).
This gateway claims a route when its first local socket joins it, releases it when the last
one left, and proves it is alive with one command per `OWNERSHIP_TTL / 3`, whatever it holds.
Which sockets are in which route is the hub's to say (`hub.py`); this module only keeps Redis
in step with it:

* claims of one moment leave together (`shared.batching`): a connect storm of 2000 joins is a
  few Redis calls, not 2000; a failed claim is retried on the next heartbeat;
* releases are batched by one loop; a route joined again meanwhile is kept (and claimed again
  if the join raced the release in Redis); a failed batch is retried;
* every route is claimed again when Redis had forgotten this gateway (its data lost), after
  the subscription comes back, and every `RECLAIM_SECONDS` (the route keys live a day).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from redis.exceptions import RedisError

from shared.batching import Batcher
from shared.registry import RECLAIM_SECONDS, RedisOwnershipRegistry

from .hub import Hub

log = logging.getLogger(__name__)

RELEASE_RETRY_SECONDS = 0.5


class Ownership:
    def __init__(
        self,
        registry: RedisOwnershipRegistry,
        hub: Hub[Any],
        ttl_seconds: float,
        *,
        has_sockets: Callable[[], bool],
    ) -> None:
        self.registry = registry
        self._hub = hub
        self._ttl_seconds = ttl_seconds
        self._has_sockets = has_sockets
        self._to_release: set[str] = set()  # routes whose last local socket left
        self._release_wanted = asyncio.Event()
        self._claim_failed: set[str] = set()  # routes to claim again on the next heartbeat
        self._claims: Batcher[str] = Batcher(registry.claim, name="claims", on_failure=self._on_claims_failed)

    def loops(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        """The background loops to run (and supervise) while the gateway runs."""
        return [
            ("ownership", self._heartbeat()),
            ("claims", self._claims.run()),
            ("ownership-release", self._release_batches()),
        ]

    async def claim(self, route: str) -> None:
        """Claim a route whose first local socket joined; returns once the claim's batch was
        sent (a failed batch is retried later, never raised here)."""
        await self._claims.submit(route)

    def release_later(self, route: str) -> None:
        """The route's last local socket left: released with the next batch, unless joined again."""
        self._to_release.add(route)
        self._release_wanted.set()

    async def claim_all(self) -> None:
        """Claim again every route held (after the subscription came back: Redis may have
        restarted empty)."""
        routes = self._hub.routes()
        if routes:
            await self.registry.claim(routes)

    async def leave(self) -> None:
        """On stop: no longer an owner of anything, at once."""
        try:
            await self.registry.leave()
            await self.registry.release([*self._hub.routes(), *self._to_release])
        except RedisError as exc:
            log.warning("could not release sessions on stop (%s); they expire by TTL", exc)

    async def _release_batches(self) -> None:
        """Release, in batches, the routes whose last local socket left.

        One pipeline for whatever accumulated, never one Redis call per closing socket: 1000
        sockets closing at once each awaited their own release, exhausted the pool, and left
        905 sessions owned in Redis 3 s later.
        """
        while True:
            await self._release_wanted.wait()
            self._release_wanted.clear()
            batch = [route for route in self._to_release if not self._hub.holds(route)]
            self._to_release.clear()
            if not batch:
                continue
            try:
                await self.registry.release(batch)
            except RedisError as exc:
                log.warning("release of %d route(s) failed (%s); retrying", len(batch), exc)
                self._to_release.update(batch)
                await asyncio.sleep(RELEASE_RETRY_SECONDS)
                self._release_wanted.set()
                continue
            rejoined = [route for route in batch if self._hub.holds(route)]
            if rejoined:
                await self._claim_now(rejoined)

    async def _claim_now(self, routes: list[str]) -> None:
        try:
            await self.registry.claim(routes)
        except RedisError as exc:
            self._on_claims_failed(routes, exc)

    def _on_claims_failed(self, routes: list[str], exc: Exception) -> None:
        log.warning("claim of %d route(s) failed (%s); retried on the next heartbeat", len(routes), exc)
        self._claim_failed.update(routes)

    async def _heartbeat(self) -> None:
        """Liveness every ownership TTL / 3: one command, whatever this gateway holds."""
        interval = self._ttl_seconds / 3
        next_reclaim = time.monotonic() + RECLAIM_SECONDS
        while True:
            try:
                forgotten = await self.registry.heartbeat()
            except RedisError as exc:
                log.warning("liveness heartbeat failed (%s)", exc)
                forgotten = False
            retry = [route for route in self._claim_failed if self._hub.holds(route)]
            self._claim_failed.clear()
            if (forgotten and self._has_sockets()) or time.monotonic() >= next_reclaim:
                next_reclaim = time.monotonic() + RECLAIM_SECONDS
                retry = self._hub.routes()
            if retry:
                await self._claim_now(retry)
            await asyncio.sleep(interval)
