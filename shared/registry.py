"""Ownership: which gateways hold at least one socket of a route (a session, or a room).

Contract (`OwnershipRegistry`):
  * `heartbeat()`  proves this gateway alive for `ttl` from now (Redis clock). One command per
                   gateway per tick, whatever it holds: liveness is per gateway, not per route.
  * `claim(keys)`  makes this gateway an owner of each route (and alive). Atomic per call.
  * `release(keys)` removes this gateway as owner at once (its last local socket of it gone).
  * `leave()`      this gateway stops being alive now (a clean shutdown).
  * `owners(key)`, `owners_of(keys)` list the *alive* owners. A gateway that dies without
                   releasing stops being listed `ttl` after its last heartbeat, and its entries
                   are pruned by the next reader.
An owner listed here may already have lost its socket (release in flight): deliveries to it are
dropped there, never misrouted. A gateway that holds a socket is always listed once its claim
returned, as long as it keeps its heartbeat.

Redis layout:
  * `Keys.gateways_alive` ZSET gateway_id -> liveness expiry (ms, Redis clock); in a Cluster
    one copy per key group, written by the same heartbeat.
  * `Keys.route_owners(key)` ZSET gateway_id -> claim time (ms). The key lives `ROUTE_TTL_MS`
    and a gateway re-claims what it holds every `RECLAIM_SECONDS`, so a route nobody reads
    again after its gateways died is gone within a day without any per-route refresh traffic.
Idle cost: one ZADD per gateway per `ttl/3`, plus one claim per held route per
`RECLAIM_SECONDS` (a ZADD and a PEXPIRE every 6 h): ~0.006 commands per held route per
minute. It was 112 when every
route's lease was refreshed every `ttl/3`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Sequence
from typing import Protocol, TypeVar

import redis.asyncio as aioredis

from shared.keys import Keys

ROUTE_TTL_MS = 24 * 3600 * 1000
RECLAIM_SECONDS = 6 * 3600.0

# Lua shared by every script that lists owners. `now` in ms from the Redis clock; `alive` is the
# liveness ZSET; `cache` memoises each gateway's verdict within one script call.
NOW_LUA = """
local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
"""
OWNERS_LUA = (
    NOW_LUA
    + """
local function live_owners(owners_key, alive, now, cache)
  local live = {}
  for _, gw in ipairs(redis.call('ZRANGE', owners_key, 0, -1)) do
    local ok = cache[gw]
    if ok == nil then
      local expiry = redis.call('ZSCORE', alive, gw)
      ok = expiry ~= false and tonumber(expiry) > now
      cache[gw] = ok
    end
    if ok then live[#live + 1] = gw else redis.call('ZREM', owners_key, gw) end
  end
  return live
end
"""
)

# KEYS[1]: liveness zset. ARGV: owner id, liveness ttl ms. Returns 1 when the entry was new
# (first beat, or Redis lost it: the caller re-claims its routes).
_HEARTBEAT = (
    NOW_LUA
    + """
local now = redis_now_ms()
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - 86400000)
return redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
"""
)

# KEYS[1]: liveness zset, KEYS[2..]: owner zsets. ARGV: owner id, liveness ttl ms, route ttl ms.
_CLAIM = (
    NOW_LUA
    + """
local now = redis_now_ms()
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
for i = 2, #KEYS do
  redis.call('ZADD', KEYS[i], now, ARGV[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[3])
end
return #KEYS - 1
"""
)

# KEYS[1]: liveness zset, KEYS[2..]: owner zsets. Returns one list of live owners per zset.
_OWNERS = (
    OWNERS_LUA
    + """
local now, cache, result = redis_now_ms(), {}, {}
for i = 2, #KEYS do result[#result + 1] = live_owners(KEYS[i], KEYS[1], now, cache) end
return result
"""
)

T = TypeVar("T")
CLAIM_BATCH = 500  # keys per script call: keeps each call short (Redis is single-threaded)


class OwnershipRegistry(Protocol):
    async def claim(self, keys: Sequence[str]) -> None: ...
    async def release(self, keys: Sequence[str]) -> None: ...
    async def owners(self, key: str) -> list[str]: ...


class RedisOwnershipRegistry:
    """One Redis implementation. In a Cluster every call is split by key group (`shared.keys`):
    one script call per group, each touching one slot; elsewhere there is one group."""

    def __init__(self, client: aioredis.Redis, keys: Keys, owner_id: str, ttl_seconds: float):
        self._client = client
        self._keys = keys
        self._owner_id = owner_id
        self._ttl_ms = int(ttl_seconds * 1000)
        self._heartbeat = client.register_script(_HEARTBEAT)
        self._claim = client.register_script(_CLAIM)
        self._owners = client.register_script(_OWNERS)

    async def heartbeat(self) -> bool:
        """Stay alive for another ttl. True when Redis had no entry for this gateway (first
        beat, or Redis lost its data): the caller should claim everything it holds again."""
        added = await asyncio.gather(
            *(
                self._heartbeat(keys=[alive], args=[self._owner_id, self._ttl_ms])
                for alive in self._keys.alive_sets
            )
        )
        return any(added)

    async def leave(self) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for alive in self._keys.alive_sets:
                pipe.zrem(alive, self._owner_id)
            await pipe.execute()

    async def claim(self, keys: Sequence[str]) -> None:
        for group, routes in self._by_group(keys):
            for batch in _batches([route for _, route in routes], CLAIM_BATCH):
                await self._claim(
                    keys=[self._keys.gateways_alive(group), *(self._keys.route_owners(k) for k in batch)],
                    args=[self._owner_id, self._ttl_ms, ROUTE_TTL_MS],
                )

    async def release(self, keys: Sequence[str]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrem(self._keys.route_owners(key), self._owner_id)
            await pipe.execute()

    async def owners(self, key: str) -> list[str]:
        return (await self.owners_of([key]))[0]

    async def owners_of(self, keys: Sequence[str]) -> list[list[str]]:
        """Live owners of each route, in one script call per `CLAIM_BATCH` routes of a group."""
        result: list[list[str]] = [[] for _ in keys]
        for group, routes in self._by_group(keys):
            for batch in _batches(routes, CLAIM_BATCH):
                lists = await self._owners(
                    keys=[self._keys.gateways_alive(group), *(self._keys.route_owners(k) for _, k in batch)]
                )
                for (index, _), owners in zip(batch, lists, strict=True):
                    result[index] = decode_names(owners)
        return result

    def _by_group(self, routes: Sequence[str]) -> list[tuple[int, list[tuple[int, str]]]]:
        """The routes (with their positions) by key group; one group outside a Cluster."""
        groups: dict[int, list[tuple[int, str]]] = {}
        for index, route in enumerate(routes):
            groups.setdefault(self._keys.group_of(route), []).append((index, route))
        return sorted(groups.items())


def decode_names(values: Iterable[bytes | str]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def _batches(items: Iterable[T], size: int) -> Iterable[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
