"""Ownership: which gateways hold at least one socket of a route (a session, or a room).

Contract (`OwnershipRegistry`):
  * `claim(keys)`  makes this gateway an owner of each route for `ttl` from now (Redis clock);
                   calling it again refreshes the lease. Atomic per call.
  * `release(keys)` removes this gateway as owner at once (its last local socket of it gone).
  * `owners(key)`  lists the gateways whose lease has not expired. A gateway that dies without
                   releasing stops being listed `ttl` after its last refresh.
An owner listed here may already have lost its socket (release in flight): deliveries to it are
dropped there, never misrouted. A gateway that holds a socket is always listed once its claim
returned, as long as it keeps refreshing.

Redis layout: `Keys.route_owners(key)` is a ZSET gateway_id -> expiry ms; expiry uses the
Redis server's clock (TIME inside the scripts), so pods' clock skew does not matter.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

import redis.asyncio as aioredis

from shared.keys import Keys

# KEYS: owner zsets. ARGV: owner id, ttl ms. Raises each key's TTL to at least ttl.
_CLAIM = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  if redis.call('PTTL', key) < ttl then redis.call('PEXPIRE', key, ttl) end
end
return #KEYS
"""

# KEYS[1]: owner zset. Prunes expired owners (dead gateways), returns the live ones.
_OWNERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""

CLAIM_BATCH = 500  # keys per script call: keeps each call short (Redis is single-threaded)


class OwnershipRegistry(Protocol):
    async def claim(self, keys: Sequence[str]) -> None: ...
    async def release(self, keys: Sequence[str]) -> None: ...
    async def owners(self, key: str) -> list[str]: ...


class RedisOwnershipRegistry:
    def __init__(self, client: aioredis.Redis, keys: Keys, owner_id: str, ttl_seconds: float):
        self._client = client
        self._keys = keys
        self._owner_id = owner_id
        self._ttl_ms = int(ttl_seconds * 1000)
        self._claim = client.register_script(_CLAIM)
        self._owners = client.register_script(_OWNERS)

    async def claim(self, keys: Sequence[str]) -> None:
        for batch in _batches(keys, CLAIM_BATCH):
            await self._claim(
                keys=[self._keys.route_owners(k) for k in batch],
                args=[self._owner_id, self._ttl_ms],
            )

    async def release(self, keys: Sequence[str]) -> None:
        async with self._client.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.zrem(self._keys.route_owners(key), self._owner_id)
            await pipe.execute()

    async def owners(self, key: str) -> list[str]:
        result = await self._owners(keys=[self._keys.route_owners(key)])
        return [o.decode() if isinstance(o, bytes) else str(o) for o in result]


def _batches(items: Iterable[str], size: int) -> Iterable[list[str]]:
    batch: list[str] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
