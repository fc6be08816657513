"""The push path end to end: two gateways, two fetchers, real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from shared.envelopes import Cart, CartRequests, decode_for_fetchers, decode_for_gateway, encode
from shared.keys import SESSION_MESSAGES_CHANNEL
from shared.protocol import session_hash, session_room_id
from tests.support.data import add_application
from tests.support.metrics import metric_value
from tests.support.stack import Stack, running_stack, trigger
from tests.support.tabs import Tab
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

SID = "abcDEF123-sess,1"
OTHER = "zzzOTHER-session-2"


async def open_tabs(stack: Stack, session: str, per_gateway: int = 2) -> list[Tab]:
    tabs = []
    for running in stack.gateways:
        for _ in range(per_gateway):
            tab = await Tab.open(running.url, session=session)
            await tab.wait_pushes(1)  # the join-time cart
            tabs.append(tab)
    return tabs


async def test_every_tab_on_both_gateways_gets_each_push_exactly_once(stack: Stack, db, redis_url):
    await add_application(db, SID, name="First")
    tabs = await open_tabs(stack, SID)
    bystander = await Tab.open(stack.gateways[0].url, session=OTHER)
    await bystander.wait_pushes(1)
    assert all(t.pushes()[0]["data"]["count"] == 1 for t in tabs)

    await add_application(db, SID, name="Second")
    await trigger(redis_url, SID)
    for tab in tabs:
        pushes = await tab.wait_pushes(2)
        assert pushes[1]["data"]["count"] == 2
        assert [a["name"] for a in pushes[1]["data"]["applications"]] == ["First", "Second"]
    await asyncio.sleep(1.0)  # room for a duplicate to show up, if the split were wrong
    assert [len(t.pushes()) for t in tabs] == [2] * len(tabs)
    assert len(bystander.pushes()) == 1, "another session's tab must get nothing"
    # One cart per join (4 tabs + the bystander) and one for the trigger: not one per replica.
    # Joins after the first read of a session may be served from its snapshot.
    carts = sum(
        metric_value(f.metrics.carts_read) + metric_value(f.metrics.carts_from_snapshot)
        for f in stack.fetchers
    )
    assert carts == 6


async def test_join_gets_connection_success_and_current_cart(stack: Stack, db):
    await add_application(db, SID, name="Cart item")
    tab = await Tab.open(stack.gateways[1].url, session=SID)
    [hello] = await tab.wait_for("connection_success")
    assert hello["roomId"] == session_room_id(SID)
    assert hello["rooms"][0]["type"] == "session"
    [push] = await tab.wait_pushes(1)
    data = push["data"]
    assert data["source"] == "server_push" and data["error"] is False and data["status"] == "success"
    assert data["sessionId"] == SID[:8] + "..."
    assert data["count"] == 1 and data["diff"] is None and isinstance(data["seq"], int)
    assert "session_id" not in data["applications"][0]
    assert "requestId" not in push


async def test_request_reply_goes_only_to_the_asking_socket(stack: Stack, db):
    await add_application(db, SID)
    asker, sibling = await open_tabs(stack, SID, per_gateway=1)
    await asker.send({"type": "get_partial_applications", "requestId": "req-42"})
    replies = await asker.wait_for("partial_applications_response", 2)
    reply = replies[-1]
    assert reply["requestId"] == "req-42"
    assert "source" not in reply["data"] and reply["data"]["count"] == 1
    assert reply["data"]["seq"] >= asker.pushes()[0]["data"]["seq"]
    await asyncio.sleep(0.5)
    assert len(sibling.of_type("partial_applications_response")) == 1, "only the join push"


async def test_burst_of_triggers_coalesces_and_delivers_the_final_state(stack: Stack, db, redis_url):
    tabs = await open_tabs(stack, SID, per_gateway=1)
    client = aioredis.Redis.from_url(redis_url)
    try:
        for i in range(50):
            await add_application(db, SID, name=f"item {i}")
            await client.publish(
                SESSION_MESSAGES_CHANNEL,
                json.dumps({"type": "update_partial_applications", "sessionId": SID}),
            )
    finally:
        await client.aclose()
    for tab in tabs:
        await eventually(lambda tab=tab: tab.pushes()[-1]["data"]["count"] == 50, 15, what="final cart")
        seqs = [p["data"]["seq"] for p in tab.pushes()]
        assert seqs == sorted(set(seqs)), "seq strictly increases"
        assert len(tab.pushes()) < 51, "a burst is coalesced"
    coalesced = sum(metric_value(f.metrics.triggers_coalesced) for f in stack.fetchers)
    assert coalesced > 0


async def test_session_targeted_and_refresh_bookinguser_reach_the_tabs(stack: Stack, redis_url):
    tabs = await open_tabs(stack, SID, per_gateway=1)
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.publish(
            SESSION_MESSAGES_CHANNEL,
            json.dumps(
                {
                    "type": "session_targeted",
                    "sessionId": SID,
                    "data": {
                        "type": "server_message",
                        "action": "new",
                        "sessionId": SID,
                        "messages": [{"id": 1, "type": "info", "text": "Hei"}],
                    },
                }
            ),
        )
        await client.publish(
            SESSION_MESSAGES_CHANNEL,
            json.dumps(
                {"type": "refresh_bookinguser", "sessionId": SID, "timestamp": "2025-05-12T11:54:20+00:00"}
            ),
        )
    finally:
        await client.aclose()
    for tab in tabs:
        [message] = await tab.wait_for("server_message")
        assert message["messages"][0]["text"] == "Hei"
        assert message["sessionId"] == SID[:8] + "...", "session id routed from Redis is masked"
        assert "timestamp" in message
        [refresh] = await tab.wait_for("refresh_bookinguser")
        assert refresh["action"] == "refresh" and refresh["timestamp"] == "2025-05-12T11:54:20+00:00"


async def test_mass_invalidation_far_above_the_redis_pool_size_loses_nothing(stack: Stack, redis_url, db):
    """redis-py's asyncio pool holds 100 connections by default: one task per trigger in a
    mass invalidation used to fail with MaxConnectionsError and silently lose pushes. 1500
    sessions held by a probe gateway, 1500 triggers at once: every one must be delivered,
    exactly once, in batches (a mass invalidation cost one SQL statement per trigger)."""
    from shared.keys import Keys
    from shared.registry import RedisOwnershipRegistry

    sessions = [f"mass-{i}" for i in range(1500)]
    keys = Keys(stack.prefix)
    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    try:
        await RedisOwnershipRegistry(client, keys, "probe", 60).claim([session_hash(s) for s in sessions])
        await pubsub.subscribe(keys.gateway_channel("probe"))
        async with client.pipeline(transaction=False) as pipe:
            for sid in sessions:
                pipe.publish(
                    SESSION_MESSAGES_CHANNEL,
                    json.dumps({"type": "update_partial_applications", "sessionId": sid}),
                )
            await pipe.execute()
        received: list[dict] = []
        messages = 0

        async def drain() -> None:
            nonlocal messages
            while len(received) < len(sessions):
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message:
                    messages += 1
                    received.extend(decode_for_gateway(message["data"]))  # type: ignore[arg-type]

        await asyncio.wait_for(drain(), 60)
        await asyncio.sleep(0.5)  # room for a duplicate
        while message := await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1):
            received.extend(decode_for_gateway(message["data"]))  # type: ignore[arg-type]
    finally:
        await pubsub.aclose()
        await client.aclose()
    assert all(isinstance(e, Cart) for e in received)
    assert sorted(e.session_hash for e in received) == sorted(session_hash(s) for s in sessions), "each once"
    assert all(e.ok and e.push and e.count == 0 for e in received)
    statements = sum(metric_value(f.metrics.cart_queries) for f in stack.fetchers)
    print(f"1500 triggers: {statements:.0f} cart statements, {messages} messages to the gateway")
    assert statements < len(sessions) / 4, "read in batches"
    assert messages < len(sessions) / 4, "published in batches"


async def test_gateway_never_sends_an_older_cart_after_a_newer_one(redis_url, database_url, prefix):
    """Around a shard hand-over two fetchers may answer out of order. The test plays the
    fetcher on the gateway's channel: a late, older push is dropped, and a reply older than
    what the tab has is asked for again instead of being shown."""
    from shared.keys import Keys

    keys = Keys(prefix)
    async with running_stack(redis_url, database_url, prefix, gateways=1, fetchers=0) as stack:
        gateway = stack.gateways[0].gateway
        client = aioredis.Redis.from_url(redis_url)
        requests = client.pubsub()
        await requests.subscribe(keys.fetcher_requests_channel)
        try:
            tab = await Tab.open(stack.gateways[0].url, session=SID)
            await tab.wait_for("connection_success")

            async def publish_cart(seq: int, *, all_tabs: bool, tokens=()) -> None:
                cart = Cart(
                    session_hash(SID), "x...", seq, "t", "[]", count=seq, push=all_tabs, tokens=list(tokens)
                )
                await client.publish(keys.gateway_channel("gw1"), encode(cart))

            await publish_cart(10, all_tabs=True)
            await tab.wait_pushes(1)
            await publish_cart(9, all_tabs=True)  # late and older: dropped
            await tab.send({"type": "get_partial_applications", "requestId": "r"})
            token = await eventually(
                lambda: next((t for t, p in gateway.requests.pending.waiting() if p.kind == "get"), None)
            )
            await publish_cart(8, all_tabs=False, tokens=[(token, "get")])  # older reply: asked again

            async def asked_again() -> bool:
                while message := await requests.get_message(ignore_subscribe_messages=True, timeout=0.1):
                    request, _errors = decode_for_fetchers(message["data"])  # type: ignore[arg-type]
                    if isinstance(request, CartRequests) and any(i.kind == "get" for i in request.items):
                        return True
                return False

            # the first GET (from the tab) and the second (the gateway asking again)
            assert await eventually(asked_again) and await eventually(asked_again)
            await publish_cart(11, all_tabs=False, tokens=[(token, "get")])
            [reply] = [
                f for f in await tab.wait_for("partial_applications_response", 2) if f.get("requestId")
            ]
            assert reply["data"]["seq"] == 11
            assert [f["data"]["seq"] for f in tab.of_type("partial_applications_response")] == [10, 11]
            assert metric_value(gateway.metrics.stale_carts_dropped) == 1
        finally:
            await requests.aclose()
            await client.aclose()


async def test_stopping_gateway_tells_tabs_to_reconnect_and_releases_its_sessions(stack: Stack):
    first, second = stack.gateways
    tab = await Tab.open(first.url, session=SID)
    other = await Tab.open(second.url, session=SID)
    await tab.wait_pushes(1)
    await other.wait_pushes(1)
    await first.stop()
    stack.gateways.remove(first)
    assert await tab.wait_closed() == 1001
    [notice] = tab.of_type("reconnect_required")
    assert 0 <= notice["retryAfterMs"] <= 500, "spread over the drain window (0.5 s here)"
    assert await stack.fetchers[0].registry.owners(session_hash(SID)) == ["gw2"]
    assert other.closed_code is None
