"""Gateway pieces without I/O: carts rendered once and spliced, the bounded outbox, the hub."""

from __future__ import annotations

import json

import pytest

from services.gateway.outbox import Outbox, Outgoing
from services.gateway.rendering import render_cart, stamp
from shared.envelopes import Cart, decode_for_gateway, encode
from shared.protocol import session_hash

pytestmark = pytest.mark.anyio

CART = Cart(
    session_hash("abcdefghijk"),
    "abcdefgh...",
    42,
    "2025-05-12T11:54:20+00:00",
    '[{"id":1,"name":"\\u0000applications\\u0000"}]',
    count=1,
    push=True,
)


def test_the_fixture_is_a_cart_a_gateway_accepts():
    """The cart these tests render is one the validator lets through (an earlier fixture had a
    session hash of one character, which every gateway rejects)."""
    assert decode_for_gateway(encode(CART)) == [CART]


def test_push_frame_shape():
    frame = json.loads(render_cart(CART, push=True))
    assert frame == {
        "type": "partial_applications_response",
        "data": {
            "error": False,
            "status": "success",
            "applications": [{"id": 1, "name": "\x00applications\x00"}],
            "count": 1,
            "sessionId": "abcdefgh...",
            "source": "server_push",
            "timestamp": "2025-05-12T11:54:20+00:00",
            "seq": 42,
            "diff": None,
        },
        "timestamp": "2025-05-12T11:54:20+00:00",
    }


def test_reply_frame_has_request_id_and_no_source_even_if_request_id_mimics_the_slot():
    sneaky = "\x00applications\x00"
    frame = json.loads(render_cart(CART, push=False, request_id=sneaky, has_request_id=True))
    assert frame["requestId"] == sneaky
    assert "source" not in frame["data"] and frame["data"]["applications"][0]["id"] == 1


def test_error_frame():
    failed = Cart(CART.session_hash, CART.masked_session_id, 43, CART.fetched_at, None, error="db down")
    frame = json.loads(render_cart(failed, push=True))
    assert frame["data"]["error"] is True and frame["data"]["status"] == "error"
    assert "applications" not in frame["data"] and frame["data"]["message"] == "db down"


def test_stamp_keeps_a_timestamp_and_adds_a_missing_one():
    assert json.loads(stamp({"type": "x", "timestamp": "t"}))["timestamp"] == "t"
    assert json.loads(stamp({"type": "x"}))["timestamp"].endswith("+00:00")


async def test_outbox_latest_cart_wins_and_overflow_is_reported():
    box = Outbox(limit=3)
    assert box.put(Outgoing("a", "x")) is True
    assert box.put(Outgoing("cart1", "cart", cart=True)) is True
    assert box.put(Outgoing("cart2", "cart", cart=True)) is None  # replaced in place
    assert box.put(Outgoing("b", "x")) is True
    assert box.put(Outgoing("c", "x")) is False  # full: slow consumer
    assert [box.pop().text for _ in range(3)] == ["a", "cart2", "b"]
    assert box.pop() is None and len(box) == 0
    box.close_after_flush(1001, "bye")
    assert box.put(Outgoing("late", "x")) is True and box.pop() is None, "closing: dropped"


# -- the hub: membership and the cart rule, without I/O ---------------------------------------


class _Member:
    def __init__(self) -> None:
        self.session_hash: str | None = None
        self.cart_seq = 0


def test_hub_reports_first_and_last_members_of_sessions_and_rooms():
    from services.gateway.hub import Hub
    from shared.protocol import room_route, session_hash

    hub: Hub[_Member] = Hub()
    a, b = _Member(), _Member()
    key, first, released = hub.join_session(a, "sessA")
    assert (key, first, released) == (session_hash("sessA"), True, None)
    assert hub.join_session(b, "sessA")[1] is False, "second member: nothing to claim"
    assert hub.join_session(a, "sessA") == (key, False, None), "joining again changes nothing"
    assert hub.leave_session(b) is None, "a member remains"
    # a moves to another session: its old one is released, the new one claimed
    new_key, first, released = hub.join_session(a, "sessB")
    assert first is True and released == key and hub.routes() == [new_key]
    assert hub.join_room(a, "entity_x_1") == (True, 1) and hub.join_room(b, "entity_x_1") == (False, 2)
    assert hub.leave_room(a, "entity_x_1") is False and hub.leave_room(b, "entity_x_1") is True
    assert hub.leave_room(b, "entity_x_1") is False, "leaving twice releases once"
    assert hub.holds(new_key) and not hub.holds(room_route("entity_x_1"))
    assert hub.leave_session(a) == new_key and hub.routes() == [] and hub.session_ids == {}


def test_hub_never_sends_an_older_cart_after_a_newer_one():
    from services.gateway.hub import Hub

    member = _Member()
    assert Hub.accept_push(member, 5) and member.cart_seq == 5
    assert not Hub.accept_push(member, 5), "the same cart is not pushed twice"
    assert not Hub.accept_push(member, 4)
    assert Hub.accept_reply(member, 5), "a reply with the tab's own cart is what it asked for"
    assert not Hub.accept_reply(member, 3) and member.cart_seq == 5


def test_pending_requests_retry_joins_and_expire_gets():
    from services.gateway.pending_requests import EXPIRED, GET, JOIN, RETRY, PendingRequests

    requests: PendingRequests[str] = PendingRequests(timeout=10, attempts=3)
    join = requests.add("tab", JOIN, None, False, now=0)
    get = requests.add("tab", GET, "r1", True, now=0)
    gone = requests.add("closed-tab", GET, None, False, now=0)
    assert requests.due(5, gone=lambda c: False) == []
    due = requests.due(10, gone=lambda c: c == "closed-tab")
    assert [(o, t) for o, t, _ in due] == [(RETRY, join), (EXPIRED, get)]
    assert len(requests) == 1 and requests.answer(gone) is None, "a closed tab's request is forgotten"
    assert [o for o, _, _ in requests.due(20, gone=lambda c: False)] == [RETRY]
    assert [o for o, _, _ in requests.due(30, gone=lambda c: False)] == [EXPIRED], "three attempts"
    token = requests.add("tab", GET, None, False, now=0)
    pending = requests.answer(token)
    assert pending is not None and requests.answer(token) is None, "answered once"
    assert requests.ask_again(token, pending, now=1) and requests.ask_again(token, pending, now=2)
    assert not requests.ask_again(token, pending, now=3), "attempts used up"
