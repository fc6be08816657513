"""The batched push path (issue #7): fetch batches, cart snapshots, per-gateway liveness.

Each test is a mechanism's promise, checked against real Redis, PostgreSQL and tabs: a batch
still gives exactly one push per tab per trigger, `seq` order holds across batches, a poisoned
session fails alone, a join served from a snapshot is never older than the last trigger, a
dead gateway stops counting as an owner within its TTL, and holding sessions costs Redis
nothing per session. Speed itself is measured by `make bench`, never asserted here.
"""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from services.fetcher.store import CartStoreError, PostgresCartStore
from shared.keys import SESSION_MESSAGES_CHANNEL, Keys
from shared.protocol import session_hash
from tests.support.data import add_application, seed_reference
from tests.support.metrics import metric_value
from tests.support.stack import Stack, trigger
from tests.support.tabs import Tab
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


async def trigger_all(redis_url: str, sessions: list[str]) -> None:
    """A mass change: every trigger in one pipeline, as fast as Redis takes them."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        async with client.pipeline(transaction=False) as pipe:
            for sid in sessions:
                payload = {"type": "update_partial_applications", "sessionId": sid}
                pipe.publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))
            await pipe.execute()
    finally:
        await client.aclose()


def cart_queries(stack: Stack) -> float:
    return sum(metric_value(f.metrics.cart_queries) for f in stack.fetchers)


def carts(tab: Tab) -> list[dict]:
    return [f["data"] for f in tab.of_type("partial_applications_response")]


async def open_pairs(stack: Stack, sessions: list[str]) -> list[Tab]:
    """One tab per session on each gateway; returns once every tab has its join-time cart."""
    tabs = [await Tab.open(g.url, session=sid) for sid in sessions for g in stack.gateways]
    for tab in tabs:
        await tab.wait_pushes(1)
    return tabs


async def test_a_burst_is_read_in_batches_and_each_tab_gets_exactly_one_push(stack: Stack, db, redis_url):
    sessions = [f"burstSession{i:04d}" for i in range(100)]
    for sid in sessions:
        await add_application(db, sid)
    tabs = await open_pairs(stack, sessions)
    before = cart_queries(stack)
    await trigger_all(redis_url, sessions)
    for tab in tabs:
        await tab.wait_pushes(2)
    await asyncio.sleep(1.0)  # room for a duplicate to show up
    assert [len(t.pushes()) for t in tabs] == [2] * len(tabs), "exactly one push per tab per trigger"
    assert all(t.pushes()[1]["data"]["count"] == 1 for t in tabs)
    statements = cart_queries(stack) - before
    print(f"100 triggers at once: {statements:.0f} cart statements")
    assert statements <= 50, "the burst is read in batches, not a statement per trigger"


async def test_seq_order_holds_across_batches(stack: Stack, db, redis_url):
    """Ten rounds of changes to 20 sessions, each round one burst: every tab sees strictly
    increasing seqs and ends on the last state, whichever batch each round fell into."""
    sessions = [f"orderSession{i:04d}" for i in range(20)]
    tabs = await open_pairs(stack, sessions)
    for round_ in range(1, 11):
        for sid in sessions:
            await add_application(db, sid, name=f"round {round_}")
        await trigger_all(redis_url, sessions)
        await asyncio.sleep(0.02 * (round_ % 3))
    for tab in tabs:
        await eventually(lambda t=tab: carts(t)[-1]["count"] == 10, 15, what="the last state")
    for tab in tabs:
        seqs = [c["seq"] for c in carts(tab)]
        assert seqs == sorted(set(seqs)), f"never an older cart after a newer one: {seqs}"


async def test_a_poisoned_session_in_a_batch_fails_alone(stack: Stack, db, redis_url):
    """One session's row cannot be shaped (an `'infinity'` date): in a batch of 30 read by
    one statement, that session gets an error cart and the other 29 their carts."""
    sessions = [f"batchMate{i:04d}" for i in range(30)]
    for sid in sessions:
        await add_application(db, sid)
    tabs = await open_pairs(stack, sessions)
    poisoned = sessions[7]
    app_id = await add_application(db, poisoned)
    await db.execute(
        "INSERT INTO bb_application_date (application_id, from_, to_) VALUES ($1, 'infinity', 'infinity')",
        app_id,
    )
    before = cart_queries(stack)
    await trigger_all(redis_url, sessions)
    for tab in tabs:
        await tab.wait_for("partial_applications_response", 2)
    for tab, sid in zip(tabs, [s for s in sessions for _ in (0, 1)], strict=True):
        latest = carts(tab)[-1]
        if sid == poisoned:
            assert latest["error"] is True and "applications" not in latest
        else:
            assert latest["error"] is False and latest["count"] == 1
    assert cart_queries(stack) - before < len(sessions), "read together, not one by one"


async def test_a_batch_postgresql_rejects_is_read_again_one_by_one(database_url, db):
    """A batch the database refuses for one session's data (here a NUL byte in an id, which
    only the store's own callers could send) is read again session by session."""
    await seed_reference(db)
    await add_application(db, "goodSession00001")
    store = PostgresCartStore(database_url, pool_size=1, timeout=5)
    try:
        result = await store.fetch_carts(["goodSession00001", "bad\x00session"])
    finally:
        await store.close()
    assert isinstance(result["bad\x00session"], CartStoreError)
    good = result["goodSession00001"]
    assert isinstance(good, list) and len(good) == 1
    assert store.statements == 3, "the batch, then each session alone"


async def test_a_join_served_from_the_snapshot_is_never_older_than_the_last_trigger(
    stack: Stack, db, redis_url
):
    sid = "snapshotSession01"
    await add_application(db, sid)
    first = await Tab.open(stack.gateways[0].url, session=sid)
    assert (await first.wait_pushes(1))[0]["data"]["count"] == 1
    read = sum(metric_value(f.metrics.carts_read) for f in stack.fetchers)

    # An unchanged cart: a second tab is served from the snapshot, without SQL.
    second = await Tab.open(stack.gateways[1].url, session=sid)
    assert (await second.wait_pushes(1))[0]["data"]["count"] == 1
    assert sum(metric_value(f.metrics.carts_from_snapshot) for f in stack.fetchers) == 1
    assert sum(metric_value(f.metrics.carts_read) for f in stack.fetchers) == read

    # Changed while nobody holds the session: the trigger (with no one to push to) still
    # invalidates the snapshot, so the next join reads the new cart.
    await first.close()
    await second.close()
    fetcher = stack.fetchers[0]
    await eventually(lambda: _no_owner(fetcher, sid), 10, what="session released")
    await add_application(db, sid)
    await trigger(redis_url, sid)
    await eventually(lambda: sum(metric_value(f.metrics.triggers_unheld) for f in stack.fetchers) >= 1)
    third = await Tab.open(stack.gateways[0].url, session=sid)
    assert (await third.wait_pushes(1))[0]["data"]["count"] == 2, "not the snapshot from before"

    # Changed while held: the trigger's read is the new snapshot; a join after it gets it.
    await add_application(db, sid)
    await trigger(redis_url, sid)
    assert (await third.wait_pushes(2))[1]["data"]["count"] == 3
    fourth = await Tab.open(stack.gateways[1].url, session=sid)
    [pushed] = await fourth.wait_pushes(1)
    assert pushed["data"]["count"] == 3
    assert pushed["data"]["seq"] == third.pushes()[1]["data"]["seq"], "the trigger's own snapshot"


async def _no_owner(fetcher, sid: str) -> bool:
    return await fetcher.registry.owners(session_hash(sid)) == []


async def test_a_gateway_that_dies_stops_counting_as_an_owner_within_its_ttl(stack: Stack, redis_url):
    """No release, no goodbye: its heartbeat stops. Owners are listed by liveness, so the
    session stops counting within the ownership TTL (3 s here) and nothing is sent to it."""
    sid = "deadGatewaySession"
    dying = stack.gateways[0]
    tab = await Tab.open(dying.url, session=sid)
    await tab.wait_pushes(1)
    fetcher = stack.fetchers[0]
    assert await fetcher.registry.owners(session_hash(sid)) == [dying.gateway.id]
    for task in dying.gateway._tasks:  # the process "dies": no more heartbeats, no release
        task.cancel()
    await asyncio.sleep(dying.gateway.settings.ownership_ttl_seconds)
    await eventually(lambda: _no_owner(fetcher, sid), 2, what="dead gateway dropped")
    await tab.close()


async def test_holding_sessions_costs_redis_nothing_per_session(stack: Stack, db, redis_url):
    """Bug: every held session was claimed again every TTL/3 (112 commands per session per
    minute). Now liveness is per gateway: 60 sessions held on two gateways for 4 s (the TTL
    is 3 s here) cost the same few heartbeats as none."""
    sessions = [f"idleSession{i:04d}" for i in range(30)]
    await open_pairs(stack, sessions)
    client = aioredis.Redis.from_url(redis_url)
    try:
        before = await client.info("commandstats")
        await asyncio.sleep(4)
        after = await client.info("commandstats")
        owner_keys = [Keys(stack.prefix).route_owners(session_hash(s)) for s in sessions]
        ttls = [await client.pttl(k) for k in owner_keys]
    finally:
        await client.aclose()

    def calls(stats: dict, command: str) -> int:
        return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))

    # A claim is a ZADD per session; heartbeats (gateways and fetchers) are a ZADD per process.
    zadds = calls(after, "zadd") - calls(before, "zadd")
    print(f"4 s holding 60 sessions: {zadds} ZADD calls")
    assert zadds < 60, "per-process heartbeats only (a per-session refresh would be ~240)"
    assert min(ttls) > 3600 * 1000, (
        "the owners keys of sessions live long and are not refreshed by the second"
    )
