"""Session ownership and shard leases against a real Redis."""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis

from services.fetcher.shards import ShardLeases
from shared.keys import Keys
from shared.registry import RedisOwnershipRegistry
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


@pytest.fixture
async def client(redis_url):
    client = aioredis.Redis.from_url(redis_url)
    yield client
    await client.aclose()


async def test_claim_release_and_expiry(client, prefix):
    keys = Keys(prefix)
    gw1 = RedisOwnershipRegistry(client, keys, "gw1", ttl_seconds=1.0)
    gw2 = RedisOwnershipRegistry(client, keys, "gw2", ttl_seconds=30.0)
    await gw1.claim(["s1", "s2"])
    await gw2.claim(["s1"])
    assert sorted(await gw1.owners("s1")) == ["gw1", "gw2"]
    assert await gw1.owners("s2") == ["gw1"]
    await gw2.release(["s1"])
    assert await gw1.owners("s1") == ["gw1"]
    # gw1 "dies": no refresh, no release. It stops counting as an owner within its TTL.
    await eventually(lambda: gw2.owners("s2"), 0.1)  # still there now
    await eventually(lambda: _empty(gw2.owners("s2")), 3, what="dead gateway expired")
    assert await client.exists(keys.route_owners("s2")) == 0, "the key itself expires"


async def _empty(coro) -> bool:
    return await coro == []


async def test_claim_in_batches_beyond_the_script_batch(client, prefix):
    registry = RedisOwnershipRegistry(client, Keys(prefix), "gw1", ttl_seconds=30.0)
    sessions = [f"s{i}" for i in range(1234)]
    await registry.claim(sessions)
    assert await registry.owners("s1233") == ["gw1"]
    await registry.release(sessions)
    assert await registry.owners("s0") == []


def make_leases(client, prefix, fetcher_id, shards=16, ttl=1.5, gained=None, released=None):
    async def on_gained(shards_: list[int]) -> None:
        if gained is not None:
            gained.extend(shards_)

    async def before_release(shards_: list[int]) -> None:
        if released is not None:
            released.extend(shards_)

    return ShardLeases(
        client,
        Keys(prefix),
        fetcher_id,
        shards=shards,
        ttl_seconds=ttl,
        on_gained=on_gained,
        before_release=before_release,
    )


async def test_shards_split_fairly_and_move_when_a_fetcher_leaves_or_dies(client, prefix):
    gained_a: list[int] = []
    a = make_leases(client, prefix, "a", gained=gained_a)
    b = make_leases(client, prefix, "b")
    c = make_leases(client, prefix, "c")
    await a.tick()
    assert a.held() == list(range(16)) and sorted(gained_a) == list(range(16)), "alone: all shards"
    for _ in range(3):
        for leases in (b, a, b):
            await leases.tick()
    assert len(a.held()) == 8 and len(b.held()) == 8
    assert set(a.held()).isdisjoint(b.held())

    for _ in range(3):
        for leases in (c, a, b, c):
            await leases.tick()
    held = [x.held() for x in (a, b, c)]
    assert all(0 < len(h) <= 6 for h in held), "nobody above its fair share, ceil(16 / 3)"
    assert sorted(s for h in held for s in h) == list(range(16)), "every shard served exactly once"

    await c.stop()  # graceful: releases at once
    for leases in (a, b, a, b):
        await leases.tick()
    assert sorted(a.held() + b.held()) == list(range(16))

    # b dies silently: its leases and heartbeat expire, a takes everything.
    await asyncio.sleep(1.6)
    await a.tick()
    await a.tick()
    assert a.held() == list(range(16))


async def test_a_lost_lease_stops_local_ownership(client, prefix):
    a = make_leases(client, prefix, "a", shards=4)
    await a.tick()
    assert a.owns(0)
    await client.set(Keys(prefix).shard_lease(0), "intruder")
    await a.tick()
    assert not a.owns(0) and a.owns(1)
