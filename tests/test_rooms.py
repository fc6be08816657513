"""Entity and user rooms, and the `notifications` and `room_messages` channels (PROTOCOL.md §6)."""

from __future__ import annotations

import asyncio
import json

import pytest
import redis.asyncio as aioredis

from shared.keys import NOTIFICATIONS_CHANNEL, ROOM_MESSAGES_CHANNEL
from tests.support.metrics import metric_value
from tests.support.stack import Stack
from tests.support.tabs import Tab
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio


async def publish(redis_url: str, channel: str, payload: dict | bytes) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        await client.publish(channel, payload if isinstance(payload, bytes) else json.dumps(payload))
    finally:
        await client.aclose()


async def tabs(stack: Stack, count_per_gateway: int = 2) -> list[Tab]:
    opened = []
    for running in stack.gateways:
        for i in range(count_per_gateway):
            tab = await Tab.open(running.url, session=f"room-tab-{running.port}-{i}")
            await tab.wait_for("connection_success")
            opened.append(tab)
    return opened


async def test_entity_room_messages_reach_only_subscribed_tabs(stack: Stack, redis_url):
    a1, a2, b1, b2 = await tabs(stack)
    for tab in (a1, b1):
        await tab.send({"type": "subscribe", "entityType": "resource", "entityId": 42})
    [joined] = await b1.wait_for("room_joined")
    assert joined["roomId"] == "entity_resource_42" and joined["roomType"] == "entity"
    assert joined["entityType"] == "resource" and joined["entityId"] == 42 and joined["roomSize"] == 1
    [confirmed] = await a1.wait_for("subscription_confirmation")
    assert confirmed["status"] == "subscribed" and confirmed["entityId"] == 42

    await publish(
        redis_url,
        NOTIFICATIONS_CHANNEL,
        {
            "target": "entity",
            "entityType": "resource",
            "entityId": 42,
            "eventType": "booked",
            "data": {"slot": 1},
        },
    )
    await publish(
        redis_url,
        ROOM_MESSAGES_CHANNEL,
        {"type": "room_message", "roomId": "entity_resource_42", "action": "update", "message": "changed"},
    )
    for tab in (a1, b1):
        [event] = await tab.wait_for("entity_event")
        assert (
            event["roomId"] == "entity_resource_42"
            and event["eventType"] == "booked"
            and "timestamp" in event
        )
        [message] = await tab.wait_for("room_message")
        assert message["message"] == "changed"
    await asyncio.sleep(0.5)
    assert a2.of_type("entity_event") == [] and b2.of_type("room_message") == []

    await b1.send({"type": "unsubscribe", "entityType": "resource", "entityId": 42})
    confirmations = await b1.wait_for("subscription_confirmation", 2)
    assert confirmations[1]["status"] == "unsubscribed"
    await publish(
        redis_url,
        ROOM_MESSAGES_CHANNEL,
        {"type": "room_message", "roomId": "entity_resource_42", "message": "2nd"},
    )
    await eventually(lambda: len(a1.of_type("room_message")) == 2)
    await asyncio.sleep(0.5)
    assert len(b1.of_type("room_message")) == 1, "unsubscribed: no more room messages"


async def test_a_room_message_goes_only_to_gateways_holding_a_member(stack: Stack, redis_url):
    a1, _a2, _b1, _b2 = await tabs(stack)
    await a1.send({"type": "subscribe", "entityType": "building", "entityId": "7"})
    await a1.wait_for("subscription_confirmation")
    await publish(redis_url, ROOM_MESSAGES_CHANNEL, {"type": "room_message", "roomId": "entity_building_7"})
    await a1.wait_for("room_message")
    published = sum(metric_value(f.metrics.deliveries_published, kind="room") for f in stack.fetchers)
    assert published == 1, "one envelope, to the one gateway with a member"


async def test_user_session_and_broadcast_notifications(stack: Stack, redis_url):
    all_tabs = await tabs(stack)
    a1, a2, b1, b2 = all_tabs
    for tab in (a1, b2):
        await tab.send({"type": "update_user_info", "userId": 17})
        await tab.wait_for("user_info_update_confirmation")
    await publish(
        redis_url,
        NOTIFICATIONS_CHANNEL,
        {
            "target": "user",
            "userType": "bookinguser",
            "identifier": 17,
            "type": "notification",
            "message": "Your booking was approved",
        },
    )
    for tab in (a1, b2):
        [note] = await tab.wait_for("notification")
        assert note["message"] == "Your booking was approved"

    session = "room-tab-" + stack.gateways[1].url.split(":")[2].split("/")[0] + "-0"
    await publish(
        redis_url,
        NOTIFICATIONS_CHANNEL,
        {"target": "session", "sessionId": session, "type": "notification", "message": "only b1"},
    )
    await eventually(lambda: any(f.get("message") == "only b1" for f in b1.frames))

    await publish(redis_url, NOTIFICATIONS_CHANNEL, {"type": "cache_invalidation", "queryKeys": [["cart"]]})
    for tab in all_tabs:
        [invalidation] = await tab.wait_for("cache_invalidation")
        assert (
            invalidation["source"] == "redis"
            and invalidation["received_at"]
            and invalidation["queryKeys"] == [["cart"]]
        )
    await asyncio.sleep(0.5)
    assert [len(t.of_type("cache_invalidation")) for t in all_tabs] == [1, 1, 1, 1], (
        "every socket exactly once"
    )
    assert not any(f.get("message") == "only b1" for t in (a1, a2, b2) for f in t.frames)
    assert len(a2.of_type("notification")) == 0 and len(b1.of_type("notification")) == 1


async def test_bad_subscriptions_and_bad_payloads(stack: Stack, redis_url):
    tab = await Tab.open(stack.gateways[0].url, session="room-bad-1")
    await tab.send({"type": "subscribe", "entityType": "res ource", "entityId": 1})
    await tab.send({"type": "subscribe", "entityType": "resource"})
    errors = await tab.wait_for("error", 2)
    assert {e["code"] for e in errors} == {"INVALID_MESSAGE"}
    for payload in [
        b"nope",
        {"target": "entity", "entityType": "a b", "entityId": 1},
        {"target": "session", "sessionId": "bad id"},
        {"no": "type"},
    ]:
        await publish(redis_url, NOTIFICATIONS_CHANNEL, payload)
    await publish(redis_url, ROOM_MESSAGES_CHANNEL, {"type": "room_message", "roomId": "session_abc"})

    # Every replica receives every payload, so each one counts what it dropped.
    await eventually(
        lambda: [metric_value(f.metrics.triggers_invalid) for f in stack.fetchers] == [5, 5],
        what="all counted",
    )
