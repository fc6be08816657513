"""The per-tab protocol core, driven directly: no server, no sleeps."""

from __future__ import annotations

import json

from services.gateway.budgets import Limits
from services.gateway.tab_protocol import (
    Close,
    JoinRoom,
    JoinSession,
    LeaveRoom,
    RelayToRoom,
    RelayToSession,
    RequestCart,
    Send,
    TabProtocol,
    is_origin_allowed,
    joined_messages,
    page_scheme,
    session_from_cookie,
)
from shared.protocol import session_room_id

NAMES = ("bookingfrontendsession", "sessionphpgwsessid", "PHPSESSID")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def unstamped(text: str) -> dict:
    """A relayed message's JSON, without the timestamp the gateway adds when missing."""
    message = json.loads(text)
    assert message.pop("timestamp").endswith("+00:00")
    return message


def sent(actions) -> list[dict]:
    return [a.message for a in actions if isinstance(a, Send)]


def test_cookie_preference_and_validation():
    assert session_from_cookie("PHPSESSID=c; bookingfrontendsession=a; sessionphpgwsessid=b", NAMES) == (
        "a",
        False,
    )
    assert session_from_cookie("PHPSESSID=c; sessionphpgwsessid=b", NAMES) == ("b", False)
    assert session_from_cookie("other=1; PHPSESSID=abc,-123", NAMES) == ("abc,-123", False)
    assert session_from_cookie("bookingfrontendsession=bad!id", NAMES) == (None, True)
    assert session_from_cookie("", NAMES) == (None, False)
    assert session_from_cookie(None, NAMES) == (None, False)
    assert session_from_cookie("garbage;;=;x", NAMES) == (None, False)


def test_origin_rules():
    assert is_origin_allowed(None, "example.no", (), "https")  # not a browser
    assert is_origin_allowed("https://example.no", "example.no", (), "https")
    assert is_origin_allowed("http://localhost:8080", "localhost:8080", (), "http")
    assert not is_origin_allowed("http://localhost:8081", "localhost:8080", (), "http")
    assert not is_origin_allowed("https://evil.no", "example.no", (), "https")
    assert not is_origin_allowed("null", "example.no", (), "https")
    assert is_origin_allowed(
        "https://booking.example.no", "internal:8080", ("https://booking.example.no",), "http"
    )
    assert not is_origin_allowed("https://example.no", "example.no", ("https://booking.example.no",), "https")
    assert is_origin_allowed("https://anything.no", "x", ("*",), "http")


def test_same_origin_includes_the_scheme():
    """Bug: the same-origin default compared only host[:port], so a page on `http://site`
    (a network attacker's downgrade) could open the socket of an `https://site` deployment."""
    assert not is_origin_allowed("http://booking.example.no", "booking.example.no", (), "https")
    assert is_origin_allowed("https://booking.example.no", "booking.example.no", (), "https")
    assert not is_origin_allowed("https://booking.example.no", "booking.example.no", (), "http")
    # Behind a TLS proxy the connection is plain `ws`; the trusted X-Forwarded-Proto says https.
    assert page_scheme("ws", "https", trust_forwarded=True) == "https"
    assert page_scheme("ws", "https, http", trust_forwarded=True) == "https"
    assert page_scheme("ws", "https", trust_forwarded=False) == "http"  # not trusted: ignored
    assert page_scheme("wss", None, trust_forwarded=False) == "https"
    assert page_scheme("ws", "gopher", trust_forwarded=True) == "http"


def test_connect_with_cookie_joins_the_session():
    proto = TabProtocol()
    [join] = proto.on_open("sess-1")
    assert join == JoinSession("sess-1", via_cookie=True)
    [hello] = joined_messages(join, 2)
    assert hello["type"] == "connection_success"
    assert hello["rooms"] == [{"id": session_room_id("sess-1"), "size": 2, "type": "session"}]


def test_connect_without_cookie_then_update_session():
    proto = TabProtocol()
    [required] = sent(proto.on_open(None))
    assert required["type"] == "session_id_required" and required["code"] == "NO_SESSION"
    [join] = proto.on_text(json.dumps({"type": "update_session", "sessionId": "abc"}))
    assert join == JoinSession("abc", via_cookie=False, action="set", was_required=True)
    joined, confirm = joined_messages(join, 1)
    assert joined["type"] == "room_joined" and joined["roomType"] == "session"
    assert confirm["action"] == "set" and confirm["wasRequired"] is True and confirm["sessionId"] == "abc..."
    [again] = proto.on_text(json.dumps({"type": "update_session", "sessionId": "abc"}))
    assert again.action == "none" and again.was_required is False
    [moved] = proto.on_text(json.dumps({"type": "update_session", "sessionId": "def"}))
    assert moved.action == "updated" and proto.session_id == "def"


def test_get_partial_applications():
    proto = TabProtocol()
    proto.on_open(None)
    [reply] = sent(proto.on_text('{"type":"get_partial_applications","requestId":"r1"}'))
    assert reply["data"] == {"error": True, "status": "error", "message": "No session found"}
    assert reply["requestId"] == "r1"
    proto.on_text('{"type":"update_session","sessionId":"abc"}')
    assert proto.on_text('{"type":"get_partial_applications","requestId":"r2"}') == [RequestCart("r2", True)]
    assert proto.on_text('{"type":"get_partial_applications"}') == [RequestCart(None, False)]


def test_ping_pong_and_silent_messages():
    proto = TabProtocol()
    [pong] = sent(proto.on_text('{"type":"ping","id":"p9"}'))
    assert pong["type"] == "pong" and pong["reply_to"] == "p9" and pong["id"].startswith("pong_")
    [pong] = sent(proto.on_text('{"type":"ping"}'))
    assert pong["reply_to"] is None
    assert proto.on_text('{"type":"pong","reply_to":"ping_1"}') == []
    assert proto.on_text('{"type":"room_ping_response","roomId":"x"}') == []


def test_session_message_is_relayed_only_within_the_session():
    proto = TabProtocol()
    [error] = sent(proto.on_text('{"type":"session_message","message":"x"}'))
    assert error["code"] == "NO_SESSION"
    proto.on_open("abc")
    [relay] = proto.on_text('{"type":"session_message","message":"x"}')
    assert isinstance(relay, RelayToSession)
    assert unstamped(relay.text) == {"type": "room_message", "message": "x", "roomId": session_room_id("abc")}


def test_unknown_and_peer_types_are_refused_not_relayed():
    proto = TabProtocol(Limits(bad_message_burst=100))
    for message in [
        '{"type":"chat"}',
        '{"type":"notification"}',
        '{"x":1}',
        '{"type":7}',
    ]:
        [error] = proto.on_text(message)
        assert isinstance(error, Send) and error.message["code"] == "UNSUPPORTED_MESSAGE_TYPE"


def test_room_message_goes_only_from_a_member_to_its_entity_room():
    proto = TabProtocol(Limits(bad_message_burst=100))
    proto.on_open("abc")
    for room in ["entity_resource_1", session_room_id("abc"), "user_bookinguser_1", 7, None]:
        [error] = sent(proto.on_text(json.dumps({"type": "room_message", "roomId": room})))
        assert error["code"] == "ROOM_ACCESS_DENIED", room
    proto.on_text('{"type":"subscribe","entityType":"resource","entityId":"1"}')
    [relay] = proto.on_text('{"type":"room_message","roomId":"entity_resource_1","presence":"editing"}')
    assert isinstance(relay, RelayToRoom) and relay.room_id == "entity_resource_1"
    assert unstamped(relay.text) == {
        "type": "room_message",
        "roomId": "entity_resource_1",
        "presence": "editing",
    }


def test_request_types_this_service_does_not_implement_get_an_immediate_error_reply():
    """Today's frontend waits 8 to 15 s for these; it matches replies on the type and on
    requestId (create, delete, comment) or data.buildingId (free time), and falls back to REST
    for create/delete only when the message says "timeout" (the spec's PROTOCOL.md §3 table)."""
    proto = TabProtocol()
    proto.on_open("abc")
    cases = {
        '{"type":"create_simple_application","requestId":"booking_1","resourceId":1}': (
            "create_application_response",
            "requestId",
            "booking_1",
        ),
        '{"type":"delete_partial_application","requestId":"delete_1","applicationId":5}': (
            "delete_application_response",
            "requestId",
            "delete_1",
        ),
        '{"type":"get_free_time","buildingId":10,"startDate":"2026-01-01"}': (
            "free_time_response",
            "buildingId",
            10,
        ),
        '{"type":"get_application_detail","id":42}': ("application_detail_response", "id", 42),
        '{"type":"get_delivered_applications","offset":0}': ("delivered_applications_response", None, None),
        # The frontend waits for `add_comment_response`, by requestId; this case asserted
        # `add_application_comment_response` (what the gateway sent, and nobody read: the
        # frontend timed out after 8 s). PROTOCOL.md §3's table is the judge now.
        '{"type":"add_application_comment","requestId":"c1"}': ("add_comment_response", "requestId", "c1"),
    }
    for text, (reply_type, field, value) in cases.items():
        [reply] = sent(proto.on_text(text))
        assert reply["type"] == reply_type and reply["data"]["error"] is True
        if field == "requestId":
            assert reply["requestId"] == value
        elif field is not None:
            assert reply["data"][field] == value
        falls_back = reply_type in ("create_application_response", "delete_application_response")
        assert ("timeout" in reply["data"]["message"]) is falls_back, "only create/delete fall back to REST"


def test_bad_messages_are_rate_limited_then_closed_1008_and_refill():
    clock = FakeClock()
    proto = TabProtocol(Limits(bad_message_burst=3, bad_message_refill_per_second=1.0), clock)
    for _ in range(3):
        [error] = sent(proto.on_text("nope"))
        assert error["code"] == "INVALID_JSON"
    clock.now += 1.0  # one token back
    [error] = sent(proto.on_text("nope"))
    assert error["code"] == "INVALID_JSON"
    actions = proto.on_text("nope")
    assert sent(actions)[0]["code"] == "RATE_LIMITED"
    assert actions[-1] == Close(1008, "too many invalid messages")
    assert proto.closed and proto.on_text('{"type":"ping"}') == []


def test_binary_closes_1003():
    assert TabProtocol().on_binary() == [Close(1003, "binary frames are not supported")]


def test_user_info_joins_the_user_room():
    proto = TabProtocol(Limits(bad_message_burst=50, budgets={}))
    [join] = proto.on_text('{"type":"update_user_info","userId":"17"}')
    assert join == JoinRoom(
        "user_bookinguser_17",
        (
            {
                "type": "user_info_update_confirmation",
                "success": True,
                "message": "User info updated",
                "userId": 17,
            },
        ),
    )
    leave, join = proto.on_text('{"type":"update_user_info","userId":18,"userType":"admin"}')
    assert leave == LeaveRoom("user_bookinguser_17") and join.room_id == "user_admin_18"
    assert proto.rooms == {"user_admin_18"}
    for bad in [
        '"x"',
        "true",
        "1.5",
        "null",
        '"1e3"',
        "0",
        "-5",
        '"-5"',
        str(2**63),
        "9" * 4200,
        '"\u0661\u0662"',
    ]:
        [error] = sent(proto.on_text(f'{{"type":"update_user_info","userId":{bad}}}'))
        assert error["code"] in ("INVALID_MESSAGE", "INVALID_JSON"), bad
    assert proto.rooms == {"user_admin_18"}


def test_a_huge_user_id_is_refused_not_made_a_room():
    """Bug: `update_user_info` with a 4200-digit integer userId was accepted; it became the
    room `user_bookinguser_4444...` and a Redis key of that length. User ids are bigints."""
    proto = TabProtocol()
    [error] = sent(proto.on_text('{"type":"update_user_info","userId":' + "4" * 4200 + "}"))
    assert error["code"] == "INVALID_MESSAGE" and proto.rooms == set()
    [join] = proto.on_text(f'{{"type":"update_user_info","userId":{2**63 - 1}}}')
    assert join.room_id == f"user_bookinguser_{2**63 - 1}"


def test_subscribe_and_unsubscribe():
    proto = TabProtocol(Limits(max_rooms=2))
    [join] = proto.on_text('{"type":"subscribe","entityType":"resource","entityId":5}')
    joined, confirmation = join.replies
    assert join.room_id == "entity_resource_5" and joined["roomType"] == "entity" and joined["entityId"] == 5
    assert confirmation == {
        "type": "subscription_confirmation",
        "entityType": "resource",
        "entityId": 5,
        "status": "subscribed",
    }
    proto.on_text('{"type":"subscribe","entityType":"resource","entityId":6}')
    [error] = sent(proto.on_text('{"type":"subscribe","entityType":"resource","entityId":7}'))
    assert error["code"] == "INVALID_MESSAGE" and "At most 2" in error["message"]
    [leave] = proto.on_text('{"type":"unsubscribe","entityType":"resource","entityId":5}')
    assert leave.room_id == "entity_resource_5" and leave.replies[0]["status"] == "unsubscribed"
    assert proto.rooms == {"entity_resource_6"}
    for bad in ['"entityType":"a b","entityId":1', '"entityType":"x"', '"entityType":"x","entityId":{}']:
        [error] = sent(proto.on_text(f'{{"type":"subscribe",{bad}}}'))
        assert error["code"] == "INVALID_MESSAGE"


def test_deeply_nested_json_is_invalid_not_a_crash():
    [error] = sent(TabProtocol().on_text("[" * 100_000 + "]" * 100_000))
    assert error["code"] == "INVALID_JSON"


def test_non_standard_json_is_refused_never_echoed():
    """Bug: Python's json accepts `NaN`, `Infinity` and `\\ud800` escapes. A ping with
    `"id": NaN` was answered `{"reply_to":NaN}` (not JSON: the browser's JSON.parse threw on the
    whole frame), and a lone surrogate echoed or relayed killed the writer of the socket that
    received it (UTF-8 cannot encode it). Such input is invalid JSON; nothing is echoed."""
    proto = TabProtocol(Limits(bad_message_burst=50))
    proto.on_open("victimSession1")
    for text in [
        '{"type":"ping","id":NaN}',
        '{"type":"ping","id":Infinity}',
        '{"type":"ping","id":-Infinity}',
        '{"type":"ping","id":"\\ud800"}',
        '{"type":"session_message","text":"\\udfff lone low surrogate"}',
        '{"type":"get_partial_applications","requestId":NaN}',
    ]:
        actions = proto.on_text(text)
        assert [m["code"] for m in sent(actions)] == ["INVALID_JSON"], text
        assert not any(isinstance(a, RelayToSession | RequestCart) for a in actions)
    # A valid surrogate pair is an ordinary character, and survives the round trip.
    [relay] = proto.on_text('{"type":"session_message","text":"\\ud83d\\ude00"}')
    assert isinstance(relay, RelayToSession) and json.loads(relay.text)["text"] == "\U0001f600"


def test_valid_messages_have_budgets_and_a_new_session_id_costs_most():
    """Bug: `update_session` in a loop with made-up ids (no cookie, no Origin needed) cost one
    SQL query and one Redis key per frame: 2000 frames gave 2000 queries in 3.5 s. Valid
    messages now have budgets per socket; a change to a new session id is the strictest."""
    clock = FakeClock()
    proto = TabProtocol(clock=clock)
    proto.on_open(None)
    joins = []
    for n in range(3):
        [join] = proto.on_text(f'{{"type":"update_session","sessionId":"madeUp{n}"}}')
        joins.append(join)
    assert [j.session_id for j in joins] == ["madeUp0", "madeUp1", "madeUp2"]
    # Re-sending the current id is free (the old client does it after every reconnect).
    for _ in range(5):
        [join] = proto.on_text('{"type":"update_session","sessionId":"madeUp2"}')
        assert join.action == "none"
    actions = proto.on_text('{"type":"update_session","sessionId":"madeUp3"}')
    assert sent(actions)[0]["code"] == "RATE_LIMITED" and actions[-1] == Close(
        1008, "message budget exceeded"
    )
    assert proto.closed and proto.session_id == "madeUp2"

    refilled = TabProtocol(clock=clock)
    for n in range(3):
        refilled.on_text(f'{{"type":"update_session","sessionId":"other{n}"}}')
    clock.now += 31  # one session change per 30 s after the burst
    [join] = refilled.on_text('{"type":"update_session","sessionId":"other3"}')
    assert isinstance(join, JoinSession) and not refilled.closed


def test_any_valid_message_has_a_budget():
    clock = FakeClock()
    proto = TabProtocol(clock=clock)
    proto.on_open("victimSession1")
    replies = [sent(proto.on_text('{"type":"ping","id":1}')) for _ in range(60)]
    assert all(r[0]["type"] == "pong" for r in replies)
    actions = proto.on_text('{"type":"ping","id":1}')
    assert sent(actions)[0]["code"] == "RATE_LIMITED" and proto.closed
    steady = TabProtocol(clock=clock)
    for _ in range(500):  # 10 per second for 50 s: well within 20 per second
        clock.now += 0.1
        assert sent(steady.on_text('{"type":"ping","id":1}'))[0]["type"] == "pong"


def test_input_that_parses_but_cannot_be_written_back_gets_an_error_reply_not_a_crash():
    """Bug: `{"type": ["ping"]}` raised "unhashable type" inside the protocol, and
    `{"type": "ping", "id": 1e400}` (valid JSON: 1e400 parses as inf) was echoed in the pong,
    whose encoding then raised: each closed the socket 1011 with a traceback, and a 10,000-frame
    fuzz run ended 128 connections that way. Each now gets an error reply (or a pong without
    the id) that encodes, and the tab stays."""
    from shared.codec import dumps

    proto = TabProtocol(Limits(bad_message_burst=100))
    proto.on_open("abcdefgh1")
    proto.on_text('{"type":"subscribe","entityType":"resource","entityId":"1"}')
    cases = {
        '{"type": ["ping"]}': "UNSUPPORTED_MESSAGE_TYPE",
        '{"type": {"a": 1}}': "UNSUPPORTED_MESSAGE_TYPE",
        '{"type": 1e400}': "UNSUPPORTED_MESSAGE_TYPE",
        '{"type": "get_partial_applications", "requestId": 1e400}': "INVALID_MESSAGE",
        '{"type": "session_message", "n": 1e400}': "INVALID_MESSAGE",
        '{"type": "room_message", "roomId": "entity_resource_1", "n": [-1e999]}': "INVALID_MESSAGE",
    }
    for text, code in cases.items():
        actions = proto.on_text(text)
        assert [m["code"] for m in sent(actions)] == [code], text
        assert not any(isinstance(a, Close | RelayToSession | RelayToRoom | RequestCart) for a in actions)
        for message in sent(actions):
            dumps(message)
    [pong] = sent(proto.on_text('{"type": "ping", "id": 1e400}'))
    assert pong["type"] == "pong" and pong["reply_to"] is None
    [reply] = sent(proto.on_text('{"type": "get_free_time", "buildingId": 1e400, "requestId": -1e999}'))
    assert "buildingId" not in reply["data"] and "requestId" not in reply
    for message in (pong, reply):
        dumps(message)
    assert not proto.closed
