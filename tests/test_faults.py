"""Faults injected for real: Redis restarted or its subscribers killed, PostgreSQL cut off,
a fetcher that dies holding its shards, a subscriber left idle past redis-py's 5 s timeout."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import redis.asyncio as aioredis

from services.localservers import LocalRedis
from shared.protocol import session_hash
from tests.support.data import add_application, seed_reference
from tests.support.stack import Stack, running_stack, session_served_by, trigger
from tests.support.tabs import Tab
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

SID = "faultySession-0001"


@pytest.fixture
def own_redis():
    server = LocalRedis().start()
    try:
        yield server
    finally:
        server.cleanup()


async def tabs_on_every_gateway(stack: Stack, sid: str = SID) -> list[Tab]:
    tabs = []
    for running in stack.gateways:
        tab = await Tab.open(running.url, session=sid)
        await tab.wait_pushes(1)
        tabs.append(tab)
    return tabs


def last_count(tab: Tab) -> int | None:
    pushes = tab.pushes()
    return pushes[-1]["data"].get("count") if pushes else None


async def test_redis_restart_resubscribes_reregisters_and_converges(own_redis, database_url, prefix, db):
    await seed_reference(db)
    await add_application(db, SID)
    async with running_stack(own_redis.url, database_url, prefix) as stack:
        tabs = await tabs_on_every_gateway(stack)
        own_redis.stop()
        await eventually(lambda: not any(g.gateway.ready for g in stack.gateways), what="gateways not ready")
        await eventually(lambda: not any(f.ready for f in stack.fetchers), what="fetchers not ready")
        async with httpx.AsyncClient() as http:
            response = await http.get(stack.gateways[0].http + "/readyz")
            assert response.status_code == 503 and response.json()["checks"]["redis_subscription"] is False
            assert (await http.get(stack.gateways[0].http + "/healthz")).status_code == 200

        await add_application(db, SID)  # a change whose trigger nobody could hear
        own_redis.start()  # same port, empty: no ownership, no leases, no seq
        await eventually(lambda: all(g.gateway.ready for g in stack.gateways), 20, what="gateways ready")
        for tab in tabs:
            await eventually(lambda tab=tab: last_count(tab) == 2, 20, what="converged after restart")

        owners = await stack.fetchers[0].registry.owners(session_hash(SID))
        assert sorted(owners) == ["gw1", "gw2"], "gateways re-registered their sessions"
        await stack.wait_shards_settled()
        seqs = [tab.pushes()[-1]["data"]["seq"] for tab in tabs]
        await add_application(db, SID)
        await trigger(own_redis.url, SID)
        for tab, seq in zip(tabs, seqs, strict=True):
            await eventually(lambda tab=tab: last_count(tab) == 3, what="push after restart")
            assert tab.pushes()[-1]["data"]["seq"] > seq, "seq never goes backwards, even after Redis lost it"


async def test_killed_pubsub_connections_reconnect_and_resync(own_redis, database_url, prefix, db):
    await seed_reference(db)
    async with running_stack(own_redis.url, database_url, prefix) as stack:
        tabs = await tabs_on_every_gateway(stack)
        before = [g.gateway.subscription.reconnects for g in stack.gateways]
        client = aioredis.Redis.from_url(own_redis.url)
        try:
            await client.execute_command("CLIENT", "KILL", "TYPE", "pubsub")
            await add_application(db, SID)  # changed while the subscribers are reconnecting
        finally:
            await client.aclose()
        await eventually(
            lambda: all(
                g.gateway.subscription.reconnects > b for g, b in zip(stack.gateways, before, strict=True)
            ),
            what="gateways resubscribed",
        )
        for tab in tabs:
            await eventually(lambda tab=tab: last_count(tab) == 1, 15, what="resynced cart")
        await add_application(db, SID)
        await trigger(own_redis.url, SID)
        for tab in tabs:
            await eventually(lambda tab=tab: last_count(tab) == 2, what="push after reconnect")


async def test_idle_subscription_outlives_the_default_socket_timeout(small_stack: Stack):
    """redis-py 8 gives asyncio clients a 5 s socket timeout; a subscriber built on the
    defaults dies after 5 idle seconds. Ours must stay subscribed, and say so."""
    gateway = small_stack.gateways[0].gateway
    fetcher = small_stack.fetchers[0]
    before = (gateway.subscription.reconnects, fetcher.subscription.reconnects)
    await asyncio.sleep(7)
    assert (gateway.subscription.reconnects, fetcher.subscription.reconnects) == before
    assert gateway.subscription.live and fetcher.subscription.live


async def test_postgres_cut_off_sends_errors_then_recovers(redis_url, database_url, prefix, db, postgres_url):
    await seed_reference(db)
    await add_application(db, SID)
    port = httpx.URL(postgres_url).port or 5432
    proxy = await TcpProxy(port).start()
    proxied = database_url.replace(f":{port}/", f":{proxy.port}/")
    stack = Stack(redis_url, database_url, prefix)
    try:
        await stack.add_fetcher(database_url=proxied, db_timeout_seconds=1.0)
        await stack.add_gateway()
        await stack.wait_shards_settled()
        [tab] = await tabs_on_every_gateway(stack)
        await proxy.cut()
        await add_application(db, SID)
        await trigger(redis_url, SID)
        await eventually(lambda: tab.pushes()[-1]["data"]["error"] is True, 15, what="error push")
        error = tab.pushes()[-1]["data"]
        assert error["status"] == "error" and error["message"] and "applications" not in error
        await eventually(lambda: not stack.fetchers[0].ready, 15, what="fetcher not ready")

        await tab.send({"type": "get_partial_applications", "requestId": "while-down"})
        await eventually(
            lambda: any(f.get("requestId") == "while-down" for f in tab.frames), 15, what="reply while down"
        )
        [reply] = [f for f in tab.frames if f.get("requestId") == "while-down"]
        assert reply["data"]["error"] is True, "a database error is never an empty cart"

        await proxy.restore()
        # No new trigger: the fetcher retries after an error until the tabs have the real cart.
        await eventually(lambda: tab.pushes()[-1]["data"].get("count") == 2, 20, what="recovered cart")
        await eventually(lambda: stack.fetchers[0].ready, 15, what="fetcher ready again")
        await add_application(db, SID)
        await trigger(redis_url, SID)
        await eventually(lambda: tab.pushes()[-1]["data"].get("count") == 3, what="push after recovery")
    finally:
        await stack.close()
        await proxy.cut()


async def test_a_dead_fetchers_shards_are_taken_over_and_its_sessions_converge(stack: Stack, db, redis_url):
    dead, survivor = stack.fetchers
    sid = session_served_by(dead, "orphan")
    await add_application(db, sid)
    tabs = await tabs_on_every_gateway(stack, sid)
    # Die without releasing anything, like a killed pod.
    dead.subscription.stop()
    for task in dead._tasks:
        task.cancel()
    await dead.coalescer.stop()
    stack.fetchers.remove(dead)

    await add_application(db, sid)
    await trigger(redis_url, sid)  # lands in the gap: nobody serves that shard right now
    for tab in tabs:
        await eventually(lambda tab=tab: last_count(tab) == 2, 20, what="converged via takeover")
    await eventually(lambda: len(survivor.leases.held()) == survivor.settings.shards, 10)
    await dead.redis.aclose()


async def test_a_fetcher_stopping_gracefully_mid_traffic_loses_no_final_state(stack: Stack, db, redis_url):
    """SIGTERM path of a fetcher (`Fetcher.stop`): stop taking triggers, finish in-flight
    fetches, free the shards. Triggers sent around it may land in the hand-over gap; every
    session must still end on its latest cart."""
    sessions = [f"handover-{i}" for i in range(12)]
    tabs = []
    for sid in sessions:
        await add_application(db, sid)
        tab = await Tab.open(stack.gateways[len(tabs) % 2].url, session=sid)
        await tab.wait_pushes(1)
        tabs.append(tab)
    leaving = stack.fetchers[0]
    stopping = asyncio.create_task(leaving.stop())
    for sid in sessions:
        await add_application(db, sid)
        await trigger(redis_url, sid)
    await stopping
    stack.fetchers.remove(leaving)
    for tab in tabs:
        await eventually(lambda tab=tab: last_count(tab) == 2, 20, what="latest cart after hand-over")
    await eventually(lambda: len(stack.fetchers[0].leases.held()) == stack.fetchers[0].settings.shards, 10)
