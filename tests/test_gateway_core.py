"""Gateway pieces without I/O: cart frames rendered once and spliced, the bounded outbox."""

from __future__ import annotations

import json

import pytest

from services.gateway.frames import render_cart, stamp
from services.gateway.outbox import Frame, Outbox

pytestmark = pytest.mark.anyio

CART = {
    "kind": "cart",
    "key": "k",
    "sid": "abcdefgh...",
    "seq": 42,
    "fetched_at": "2025-05-12T11:54:20+00:00",
    "ok": True,
    "count": 1,
    "applications": '[{"id":1,"name":"\\u0000applications\\u0000"}]',
    "all": True,
    "tokens": [],
}


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
    frame = json.loads(render_cart({**CART, "ok": False, "message": "db down"}, push=True))
    assert frame["data"]["error"] is True and frame["data"]["status"] == "error"
    assert "applications" not in frame["data"] and frame["data"]["message"] == "db down"


def test_stamp_keeps_a_timestamp_and_adds_a_missing_one():
    assert json.loads(stamp({"type": "x", "timestamp": "t"}))["timestamp"] == "t"
    assert json.loads(stamp({"type": "x"}))["timestamp"].endswith("+00:00")


async def test_outbox_latest_cart_wins_and_overflow_is_reported():
    box = Outbox(limit=3)
    assert box.put(Frame("a", "x")) is True
    assert box.put(Frame("cart1", "cart", cart=True)) is True
    assert box.put(Frame("cart2", "cart", cart=True)) is None  # replaced in place
    assert box.put(Frame("b", "x")) is True
    assert box.put(Frame("c", "x")) is False  # full: slow consumer
    assert [box.pop().text for _ in range(3)] == ["a", "cart2", "b"]
    assert box.pop() is None and len(box) == 0
    box.close_after_flush(1001, "bye")
    assert box.put(Frame("late", "x")) is True and box.pop() is None, "closing: dropped"
