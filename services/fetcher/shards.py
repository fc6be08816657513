"""Shard leases: how fetcher replicas split the sessions between them instead of racing.

Every replica receives every `session_messages` trigger (pub/sub fans out) and every gateway
request; it serves only sessions whose shard (`shard_of(session_hash)`) it holds a lease on. So in
steady state each trigger is fetched exactly once, by one process that also serialises that
session's fetches (ordered `seq`).

Membership: each replica heartbeats into the `fetchers` ZSET, and into `fetchers:healthy`
while its database check passes; its fair share is ceil(shards / healthy replicas), and that of
a replica whose database does not answer is none while another can serve (a wrong Secret costs
capacity, never a visitor's cart: such a replica took its share and 11 of 40 sessions ended on
an error cart), and ceil(shards / live replicas) when none can (an error cart then beats no
cart at all). A replica over its share releases the surplus; one under it claims free shards
(SET NX PX). Leases expire `ttl` after the holder's last renewal, so a dead replica's shards
become free within `ttl`.

SHARDS is the fleet's: the first replica sets `fetchers:shards`, every agreeing one keeps it
alive (3 x ttl). A replica with another value holds nothing, is not ready, and says why
(`mismatch`), until the value it disagrees with is gone: a rolling change of SHARDS stalls
(safely) instead of serving overlapping shards; change it by scaling the fetchers to zero.

Hand-over: a graceful release cuts the message stream at a marker (`handover.py`): the giver
serves up to it, the claimer from it, replaying what it kept meanwhile, so no event is lost or
doubled. After a death (no marker) nobody serves the shard until its lease expires, and what was
published meanwhile is lost. Either way the claimer announces the shards it gained; gateways
answer with a refresh for every session of theirs in those shards. A duplicate cart push is
possible around a hand-over, a lost final state is not.

Renewal never waits: releasing surplus shards waits for their in-flight work (up to TTL/2),
and when that wait ran inside the renewal tick, the tick outlasted the local validity
(0.8·TTL) of the shards being *kept*; for ~0.2 s this fetcher served none of them, nobody else
could claim them, and 22 of 1035 triggers were dropped. Releases now run beside the ticks. If
the local validity lapses anyway (Redis slow or unreachable for a while), the next successful
renewal announces the kept shards (`on_lapsed`) so that the gateways re-ask for what may have
been dropped meanwhile.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable

import redis.asyncio as aioredis

from shared.keys import Keys

from .handover import Handovers, Message

log = logging.getLogger(__name__)

# KEYS: fetchers zset, healthy fetchers zset, the fleet's SHARDS. ARGV: id, ttl ms, healthy (1/0),
# this fetcher's SHARDS. Heartbeat into both sets (the healthy one only while the database
# answers), prune the dead, count both. A fetcher whose SHARDS is not the fleet's joins neither
# set (the others must not count it in their fair share) and is told the fleet's value.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
local fleet = redis.call('GET', KEYS[3])
if fleet and fleet ~= ARGV[4] then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {0, 0, fleet}
end
redis.call('SET', KEYS[3], ARGV[4], 'PX', ttl * 3)
for i = 1, 2 do
  if i == 1 or ARGV[3] == '1' then
    redis.call('ZADD', KEYS[i], now + ttl, ARGV[1])
  else
    redis.call('ZREM', KEYS[i], ARGV[1])
  end
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  redis.call('PEXPIRE', KEYS[i], ttl * 10)
end
return {redis.call('ZCARD', KEYS[1]), redis.call('ZCARD', KEYS[2]), ARGV[4]}
"""

# KEYS: lease keys. ARGV: id, ttl ms. Renews those still ours; returns their 1-based positions.
_RENEW = """
local held = {}
for i, key in ipairs(KEYS) do
  if redis.call('GET', key) == ARGV[1] then
    redis.call('PEXPIRE', key, ARGV[2])
    table.insert(held, i)
  end
end
return held
"""

# KEYS: (lease, hand-over) key pairs. ARGV: id, marker id ('' for none: the cut was not exact),
# hand-over key ttl ms. Frees the leases still ours and records beside each the marker they were
# given up at.
_RELEASE = """
local n = 0
for i = 1, #KEYS / 2 do
  if redis.call('GET', KEYS[2 * i - 1]) == ARGV[1] then
    redis.call('DEL', KEYS[2 * i - 1])
    if ARGV[2] == '' then
      redis.call('DEL', KEYS[2 * i])
    else
      redis.call('SET', KEYS[2 * i], ARGV[2], 'PX', ARGV[3])
    end
    n = n + 1
  end
end
return n
"""

# KEYS: (lease, hand-over) key pairs. ARGV: id, ttl ms. Claims the free leases; for each pair 0
# (taken by another) or the marker the shard was given up at, read and deleted ('' for none: its
# holder died, or it was never held). Deleted, so that a later claim after a death does not
# mistake it for its own hand-over.
_CLAIM = """
local result = {}
for i = 1, #KEYS / 2 do
  if redis.call('SET', KEYS[2 * i - 1], ARGV[1], 'NX', 'PX', ARGV[2]) then
    result[i] = redis.call('GET', KEYS[2 * i]) or ''
    redis.call('DEL', KEYS[2 * i])
  else
    result[i] = 0
  end
end
return result
"""

ShardsHandler = Callable[[list[int]], Awaitable[None]]


async def _no_marker(data: bytes) -> None:
    raise RuntimeError("no hand-over channel: the shards change hands with a gap")


class ShardLeases:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        fetcher_id: str,
        *,
        shards: int,
        ttl_seconds: float,
        on_gained: ShardsHandler,
        before_release: ShardsHandler,
        on_lapsed: ShardsHandler | None = None,
        healthy: Callable[[], bool] = lambda: True,
        publish_marker: Callable[[bytes], Awaitable[object]] | None = None,
        replay: Callable[[list[Message]], None] = lambda messages: None,
    ) -> None:
        self._client = client
        self._keys = keys
        self._id = fetcher_id
        self.shards = shards
        self._ttl_ms = int(ttl_seconds * 1000)
        self._ttl = ttl_seconds
        self._on_gained = on_gained
        self._before_release = before_release
        self._on_lapsed = on_lapsed
        self._healthy = healthy  # can this fetcher serve carts (its database check passes)?
        self.mismatch: str | None = None  # why it holds nothing: its SHARDS is not the fleet's
        self._releases: set[asyncio.Task[None]] = set()
        self._held: set[int] = set()  # leases held (renewed), served unless waiting
        self._waiting: set[int] = set()  # held, but not served until their hand-over marker passes
        self._releasing: set[int] = set()  # held until their marker passes, then freed
        self._replay = replay
        self.handovers = Handovers(
            fetcher_id,
            publish=publish_marker or _no_marker,
            on_cut=self._held.difference_update,
            on_serve=self._waiting.difference_update,
        )
        self._valid_until = 0.0  # monotonic; leases are trusted locally until then
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)
        self._claim_leases = client.register_script(_CLAIM)
        # Rendezvous order: each replica prefers different shards, so claims rarely collide.
        self._preference = sorted(
            range(shards), key=lambda n: hashlib.sha256(f"{fetcher_id}:{n}".encode()).digest()
        )
        self._stopping = asyncio.Event()

    @property
    def interval(self) -> float:
        return self._ttl / 3

    def owns(self, shard: int) -> bool:
        return shard in self._held and shard not in self._waiting and time.monotonic() < self._valid_until

    def held(self) -> list[int]:
        return sorted(self._held) if time.monotonic() < self._valid_until else []

    async def run(self) -> None:
        while not self._stopping.is_set():
            try:
                await self.tick()
            except Exception as exc:
                log.warning("shard leases: tick failed (%s: %s)", exc.__class__.__name__, exc)
            try:
                await asyncio.wait_for(self._stopping.wait(), self.interval)
            except TimeoutError:
                pass

    async def tick(self) -> None:
        started = time.monotonic()
        await self.serve_overdue()
        healthy_here = self._healthy()
        live, healthy, fleet = await self._heartbeat(
            keys=[self._keys.fetchers, self._keys.fetchers_healthy, self._keys.fetchers_shards],
            args=[self._id, self._ttl_ms, "1" if healthy_here else "0", str(self.shards)],
        )
        fleet_shards = int(fleet)
        if fleet_shards != self.shards:
            if self.mismatch is None:
                log.error(
                    "shard leases: SHARDS is %d here, %d in the running fleet: holding no shard until "
                    "the fleet agrees (change SHARDS by scaling the fetchers to zero)",
                    self.shards,
                    fleet_shards,
                )
            self.mismatch = f"SHARDS is {self.shards} here, {fleet_shards} in the running fleet"
            self._release_in_background(sorted(self._held))
            return
        if self.mismatch is not None:
            log.info("shard leases: the fleet agrees on SHARDS=%d now", self.shards)
            self.mismatch = None
        ordered = sorted(self._held)
        if ordered:
            kept = await self._renew(
                keys=[self._keys.shard_lease(n) for n in ordered], args=[self._id, self._ttl_ms]
            )
            still = {ordered[int(i) - 1] for i in kept} & self._held  # minus any released meanwhile
            lost = self._held - still
            if lost:
                log.warning("shard leases: lost %d shard(s) to expiry", len(lost))
            self._held.intersection_update(still)  # in place: the hand-over's callbacks hold it
        lapsed = bool(self._held) and 0 < self._valid_until <= time.monotonic()  # 0: never renewed yet
        # Trust the leases until slightly before they can expire in Redis.
        self._valid_until = started + self._ttl * 0.8
        if lapsed:
            log.warning("shard leases: local validity lapsed; announcing %d kept shard(s)", len(self._held))
            if self._on_lapsed is not None:
                await self._on_lapsed(sorted(self._held))

        if healthy_here:
            fair = math.ceil(self.shards / max(int(healthy), 1))
        elif int(healthy) > 0:
            fair = 0  # another fetcher can serve: this one takes no work
        else:
            fair = math.ceil(self.shards / max(int(live), 1))
        keeping = self._held - self._releasing
        if len(keeping) > fair:
            surplus = [n for n in reversed(self._preference) if n in keeping][: len(keeping) - fair]
            self._release_in_background(surplus)
        elif len(keeping) < fair:
            await self._claim(fair - len(keeping))

    async def serve_overdue(self, *, all_awaited: bool = False, announce: bool = True) -> None:
        """Serve the claimed shards whose hand-over marker never came (`Handovers.overdue`),
        replaying what was kept meanwhile; the gateways are told to ask again for their carts."""
        late = self.handovers.overdue(all_awaited=all_awaited)
        if not late:
            return
        self._waiting.difference_update(late)
        for messages in late.values():
            if messages:
                self._replay(messages)
        if announce and self._on_lapsed is not None:
            await self._on_lapsed(sorted(late))

    def _release_in_background(self, shards: list[int]) -> None:
        """Stop serving `shards` now; free their leases once their work is done, beside the
        renewal ticks (which must never wait for it)."""
        task = asyncio.get_running_loop().create_task(self.release(shards), name="shard-release")
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _claim(self, wanted: int) -> None:
        candidates = [n for n in self._preference if n not in self._held]
        values = await self._client.mget([self._keys.shard_lease(n) for n in candidates])
        free = [n for n, v in zip(candidates, values, strict=True) if v is None][:wanted]
        if not free:
            return
        keys = [key for n in free for key in (self._keys.shard_lease(n), self._keys.shard_handover(n))]
        markers = await self._claim_leases(keys=keys, args=[self._id, self._ttl_ms])
        gained = []
        for n, marker in zip(free, markers, strict=True):
            if marker == 0:
                continue  # another fetcher was quicker
            gained.append(n)
            text = marker.decode() if isinstance(marker, bytes) else str(marker)
            replay = self.handovers.adopt(n, text or None)
            self._held.add(n)
            if replay is None:
                self._waiting.add(n)  # served from its marker on
            elif replay:
                self._replay(replay)  # what came after the marker, before the live messages
        if gained:
            log.info("shard leases: gained %d shard(s), now %d", len(gained), len(self._held))
            await self._on_gained(sorted(gained))

    async def release(self, shards: list[int]) -> None:
        """Stop serving `shards` at a hand-over marker, let in-flight work finish, then free the
        leases (see `handover.py`)."""
        shards = [n for n in shards if n not in self._releasing]
        if not shards:
            return
        self._releasing.update(shards)
        self._waiting.difference_update(shards)
        self.handovers.forget(shards)
        try:
            marker = await self.handovers.cut(shards)  # `_held` loses them at the marker
            await self._before_release(shards)
            keys = [key for n in shards for key in (self._keys.shard_lease(n), self._keys.shard_handover(n))]
            await self._release(keys=keys, args=[self._id, marker, self._ttl_ms * 3])
        except Exception as exc:  # they expire by TTL instead
            log.warning("shard leases: release of %d shard(s) failed (%s)", len(shards), exc)
            return
        finally:
            self._held.difference_update(shards)
            self._releasing.difference_update(shards)
        log.info("shard leases: released %d shard(s), now %d", len(shards), len(self._held))

    async def stop(self) -> None:
        """Leave the group: free every lease so the others take over at once."""
        self._stopping.set()
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        held = sorted(self._held)
        try:
            await self.release(held)
            async with self._client.pipeline(transaction=False) as pipe:
                pipe.zrem(self._keys.fetchers, self._id)
                pipe.zrem(self._keys.fetchers_healthy, self._id)
                await pipe.execute()
        except Exception as exc:
            log.warning("shard leases: could not release on stop (%s)", exc)
