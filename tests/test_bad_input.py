"""Bad input from browsers and from Redis: a clear answer, and nobody else disturbed."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import InvalidStatus

from shared.keys import SESSION_MESSAGES_CHANNEL, Keys
from tests.support.data import add_application
from tests.support.metrics import metric_value
from tests.support.stack import Stack, trigger
from tests.support.tabs import Tab
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

SID = "victimSession123456"
ATTACKER = "attackerSession99999"


def error_codes(tab: Tab) -> list[str]:
    return [f["code"] for f in tab.of_type("error")]


async def test_malformed_frames_get_errors_and_keep_the_socket(small_stack: Stack):
    url = (await small_stack.add_gateway(bad_message_burst=50)).url
    tab = await Tab.open(url, session=SID)
    await tab.wait_pushes(1)
    for bad in ["{not json", "[1, 2]", '"text"', "5", "null"]:
        await tab.send(bad)
    await tab.send({"type": "update_session", "sessionId": "bad id!"})
    await tab.send({"type": "update_session", "sessionId": 12345})
    await tab.send({"type": "update_session", "sessionId": "x" * 129})
    await tab.send({"type": "update_session"})
    await tab.send({"type": "update_user_info", "userId": "abc"})
    await tab.send({"type": "get_partial_applications", "requestId": {"nested": True}})
    await tab.wait_for("error", 11)
    assert error_codes(tab) == ["INVALID_JSON"] * 5 + ["INVALID_SESSION_ID"] * 4 + ["INVALID_MESSAGE"] * 2
    assert all(e["message"] for e in tab.of_type("error"))
    await tab.send({"type": "ping", "id": "p1"})
    [pong] = await tab.wait_for("pong")
    assert pong["reply_to"] == "p1" and pong["id"].startswith("pong_") and "timestamp" in pong
    assert tab.closed_code is None


async def test_peer_messages_are_never_relayed_to_other_visitors(small_stack: Stack):
    url = small_stack.gateways[0].url
    victim = await Tab.open(url, session=SID)
    attacker = await Tab.open(url, session=ATTACKER)
    await victim.wait_pushes(1)
    fake_cart = {"type": "partial_applications_response", "data": {"applications": [{"id": 666}]}}
    for message in [
        {"type": "chat", "message": "hi"},
        {"type": "notification", "message": "Your card expired"},
        {"type": "room_message", "roomId": victim.of_type("connection_success")[0]["roomId"]},
        {"type": "entity_event", "entityType": "resource", "entityId": 1},
        fake_cart,
        {"no": "type"},
    ]:
        await attacker.send(message)
    await attacker.wait_for("error", 6)
    # A room_message is a real type now (entity-room presence), but only for the sender's own
    # entity rooms: into another visitor's session room it is refused.
    assert set(error_codes(attacker)) == {"UNSUPPORTED_MESSAGE_TYPE", "ROOM_ACCESS_DENIED"}
    await asyncio.sleep(0.5)
    assert [f["type"] for f in victim.frames] == ["connection_success", "partial_applications_response"]


async def test_session_message_reaches_only_the_other_tabs_of_the_session(stack: Stack):
    tabs = []
    for running in stack.gateways:
        for _ in range(2):
            tab = await Tab.open(running.url, session=SID)
            await tab.wait_pushes(1)
            tabs.append(tab)
    stranger = await Tab.open(stack.gateways[1].url, session=ATTACKER)
    await stranger.wait_pushes(1)
    sender = tabs[0]
    await sender.send({"type": "session_message", "message": "cart opened elsewhere", "data": {"x": 1}})
    for tab in tabs[1:]:
        [relayed] = await tab.wait_for("room_message")
        assert relayed["message"] == "cart opened elsewhere" and relayed["roomId"].startswith("session_")
    await asyncio.sleep(0.5)
    assert sender.of_type("room_message") == []
    assert stranger.of_type("room_message") == []
    assert all(len(t.of_type("room_message")) == 1 for t in tabs[1:])


async def test_binary_frame_closes_1003_and_others_keep_working(small_stack: Stack, db, redis_url):
    url = small_stack.gateways[0].url
    bystander = await Tab.open(url, session=SID)
    await bystander.wait_pushes(1)
    rude = await Tab.open(url, session=ATTACKER)
    await rude.ws.send(b"\x00\x01binary")
    assert await rude.wait_closed() == 1003
    await add_application(db, SID)
    await trigger(redis_url, SID)
    pushes = await bystander.wait_pushes(2)
    assert pushes[-1]["data"]["count"] == 1


async def test_oversized_frame_closes_1009(small_stack: Stack):
    tab = await Tab.open(small_stack.gateways[0].url, session=SID)
    await tab.send({"type": "ping", "id": "x" * (70 * 1024)})
    assert await tab.wait_closed() == 1009


async def test_too_many_bad_messages_rate_limited_then_closed_1008(small_stack: Stack):
    tab = await Tab.open(small_stack.gateways[0].url, session=ATTACKER)
    for _ in range(30):
        await tab.send({"type": "chat", "message": "spam"})
    assert await tab.wait_closed() == 1008
    codes = error_codes(tab)
    assert codes[-1] == "RATE_LIMITED"
    assert codes[:-1] == ["UNSUPPORTED_MESSAGE_TYPE"] * 10  # the default burst


async def test_no_cookie_then_update_session(small_stack: Stack, db):
    await add_application(db, SID)
    tab = await Tab.open(small_stack.gateways[0].url)
    [required] = await tab.wait_for("session_id_required")
    assert required["code"] == "NO_SESSION"
    await tab.send({"type": "get_partial_applications", "requestId": 7})
    [reply] = await tab.wait_for("partial_applications_response")
    assert reply["requestId"] == 7 and reply["data"]["error"] is True
    assert reply["data"]["message"] == "No session found"
    await tab.send({"type": "update_session", "sessionId": SID})
    [joined] = await tab.wait_for("room_joined")
    [confirm] = await tab.wait_for("session_update_confirmation")
    assert joined["roomType"] == "session" and joined["roomSize"] == 1
    assert confirm["action"] == "set" and confirm["wasRequired"] is True
    assert confirm["sessionId"] == SID[:8] + "..."
    [push] = await tab.wait_pushes(1)
    assert push["data"]["count"] == 1
    await tab.send({"type": "update_session", "sessionId": SID})
    confirms = await tab.wait_for("session_update_confirmation", 2)
    assert confirms[1]["action"] == "none" and confirms[1]["wasRequired"] is False
    types = [f["type"] for f in tab.frames]
    assert types.index("room_joined") < types.index("session_update_confirmation")


async def test_update_user_info(small_stack: Stack):
    tab = await Tab.open(small_stack.gateways[0].url, session=SID)
    await tab.send({"type": "update_user_info", "userId": "42"})
    [confirm] = await tab.wait_for("user_info_update_confirmation")
    assert confirm["userId"] == 42 and confirm["success"] is True


@pytest.mark.parametrize(
    ("origin", "host_port_matches"),
    [("https://evil.example", False), ("null", False)],
)
async def test_foreign_origin_is_refused_403(small_stack: Stack, origin: str, host_port_matches: bool):
    with pytest.raises(InvalidStatus) as refused:
        await Tab.open(small_stack.gateways[0].url, session=SID, origin=origin)
    assert refused.value.response.status_code == 403


async def test_same_origin_and_no_origin_are_accepted(small_stack: Stack):
    running = small_stack.gateways[0]
    same = await Tab.open(running.url, session=SID, origin=f"http://127.0.0.1:{running.port}")
    await same.wait_for("connection_success")
    headless = await Tab.open(running.url, session=SID)
    await headless.wait_for("connection_success")


async def test_allowed_origins_list(small_stack: Stack):
    running = await small_stack.add_gateway(allowed_origins=("https://booking.example.no",))
    ok = await Tab.open(running.url, session=SID, origin="https://booking.example.no")
    await ok.wait_for("connection_success")
    with pytest.raises(InvalidStatus):
        await Tab.open(running.url, session=SID, origin=f"http://127.0.0.1:{running.port}")


async def test_malformed_redis_payloads_are_counted_and_dropped(small_stack: Stack, redis_url, db, caplog):
    caplog.set_level(logging.INFO)
    tab = await Tab.open(small_stack.gateways[0].url, session=SID)
    await tab.wait_pushes(1)
    fetcher = small_stack.fetchers[0]
    bad = [
        b"\xff\xfe not json",
        b"[1,2,3]",
        json.dumps({"type": "update_partial_applications"}).encode(),
        json.dumps({"type": "update_partial_applications", "sessionId": "bad id!" + SID}).encode(),
        json.dumps({"type": "update_partial_applications", "sessionId": 5}).encode(),
        json.dumps({"type": "whatever", "sessionId": SID}).encode(),
        json.dumps({"type": "session_targeted", "sessionId": SID, "data": "not an object"}).encode(),
        json.dumps(
            {"type": "update_partial_applications", "sessionId": SID, "pad": "x" * (1024 * 1024)}
        ).encode(),
    ]
    client = aioredis.Redis.from_url(redis_url)
    try:
        for payload in bad:
            await client.publish(SESSION_MESSAGES_CHANNEL, payload)
        # Garbage on the gateway's own channel too.
        await client.publish(Keys(small_stack.prefix).gateway_channel("gw1"), b"\x00garbage")
    finally:
        await client.aclose()

    await eventually(lambda: metric_value(fetcher.metrics.triggers_invalid) == len(bad), what="all counted")
    reasons = {
        s.labels["reason"]
        for m in fetcher.metrics.triggers_invalid.collect()
        for s in m.samples
        if s.name.endswith("_total") and s.value > 0
    }
    assert reasons == {"not_json", "not_object", "bad_session_id", "unknown_type", "bad_data", "too_large"}
    gateway = small_stack.gateways[0].gateway
    await eventually(lambda: metric_value(gateway.metrics.deliveries_invalid) == 1)
    # Still serving:
    await add_application(db, SID)
    await trigger(redis_url, SID)
    await tab.wait_pushes(2)
    assert SID not in caplog.text, "a full session id was logged"
    assert "bad id!" + SID not in caplog.text and "bad id!v..." in caplog.text
