"""The per-socket protocol core, driven directly: no server, no sleeps."""

from __future__ import annotations

import json

from services.gateway.connection import (
    Close,
    ConnectionProtocol,
    JoinRoom,
    JoinSession,
    LeaveRoom,
    Limits,
    RelayToSession,
    RequestCart,
    Send,
    is_origin_allowed,
    joined_messages,
    session_from_cookie,
)
from shared.protocol import session_room_id

NAMES = ("bookingfrontendsession", "sessionphpgwsessid", "PHPSESSID")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
    assert is_origin_allowed(None, "example.no", ())  # not a browser
    assert is_origin_allowed("https://example.no", "example.no", ())
    assert is_origin_allowed("http://localhost:8080", "localhost:8080", ())
    assert not is_origin_allowed("http://localhost:8081", "localhost:8080", ())
    assert not is_origin_allowed("https://evil.no", "example.no", ())
    assert not is_origin_allowed("null", "example.no", ())
    assert is_origin_allowed("https://booking.example.no", "internal:8080", ("https://booking.example.no",))
    assert not is_origin_allowed("https://example.no", "example.no", ("https://booking.example.no",))
    assert is_origin_allowed("https://anything.no", "x", ("*",))


def test_connect_with_cookie_joins_the_session():
    proto = ConnectionProtocol()
    [join] = proto.on_open("sess-1")
    assert join == JoinSession("sess-1", via_cookie=True)
    [hello] = joined_messages(join, 2)
    assert hello["type"] == "connection_success"
    assert hello["rooms"] == [{"id": session_room_id("sess-1"), "size": 2, "type": "session"}]


def test_connect_without_cookie_then_update_session():
    proto = ConnectionProtocol()
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
    proto = ConnectionProtocol()
    proto.on_open(None)
    [reply] = sent(proto.on_text('{"type":"get_partial_applications","requestId":"r1"}'))
    assert reply["data"] == {"error": True, "status": "error", "message": "No session found"}
    assert reply["requestId"] == "r1"
    proto.on_text('{"type":"update_session","sessionId":"abc"}')
    assert proto.on_text('{"type":"get_partial_applications","requestId":"r2"}') == [RequestCart("r2", True)]
    assert proto.on_text('{"type":"get_partial_applications"}') == [RequestCart(None, False)]


def test_ping_pong_and_silent_messages():
    proto = ConnectionProtocol()
    [pong] = sent(proto.on_text('{"type":"ping","id":"p9"}'))
    assert pong["type"] == "pong" and pong["reply_to"] == "p9" and pong["id"].startswith("pong_")
    [pong] = sent(proto.on_text('{"type":"ping"}'))
    assert pong["reply_to"] is None
    assert proto.on_text('{"type":"pong","reply_to":"ping_1"}') == []
    assert proto.on_text('{"type":"room_ping_response","roomId":"x"}') == []


def test_session_message_is_relayed_only_within_the_session():
    proto = ConnectionProtocol()
    [error] = sent(proto.on_text('{"type":"session_message","message":"x"}'))
    assert error["code"] == "NO_SESSION"
    proto.on_open("abc")
    [relay] = proto.on_text('{"type":"session_message","message":"x"}')
    assert relay == RelayToSession({"type": "room_message", "message": "x", "roomId": session_room_id("abc")})


def test_unknown_and_peer_types_are_refused_not_relayed():
    proto = ConnectionProtocol(Limits(bad_message_burst=100))
    for message in [
        '{"type":"chat"}',
        '{"type":"notification"}',
        '{"type":"room_message"}',
        '{"x":1}',
        '{"type":7}',
    ]:
        [error] = proto.on_text(message)
        assert isinstance(error, Send) and error.message["code"] == "UNSUPPORTED_MESSAGE_TYPE"


def test_bad_messages_are_rate_limited_then_closed_1008_and_refill():
    clock = FakeClock()
    proto = ConnectionProtocol(Limits(bad_message_burst=3, bad_message_refill_per_second=1.0), clock)
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
    assert ConnectionProtocol().on_binary() == [Close(1003, "binary frames are not supported")]


def test_user_info_joins_the_user_room():
    proto = ConnectionProtocol()
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
    for bad in ['"x"', "true", "1.5", "null", '"1e3"']:
        [error] = sent(proto.on_text(f'{{"type":"update_user_info","userId":{bad}}}'))
        assert error["code"] == "INVALID_MESSAGE"


def test_subscribe_and_unsubscribe():
    proto = ConnectionProtocol(Limits(max_rooms=2))
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
    [error] = sent(ConnectionProtocol().on_text("[" * 100_000 + "]" * 100_000))
    assert error["code"] == "INVALID_JSON"
