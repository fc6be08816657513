"""Fetcher pieces without I/O: trigger parsing, coalescing, routing to gateways."""

from __future__ import annotations

import asyncio
import json

import pytest

from services.fetcher.cartstate import CartSnapshot
from services.fetcher.coalescer import SessionWork, WorkCoalescer
from services.fetcher.routing import route_cart
from services.fetcher.triggers import InvalidInput, parse_session_message
from shared.envelopes import GET, JOIN, Cart, decode_for_gateway, encode
from shared.protocol import session_hash

pytestmark = pytest.mark.anyio


def parse(payload: object, limit: int = 1024 * 1024):
    return parse_session_message(json.dumps(payload).encode(), limit)


def test_trigger_parsing():
    trigger = parse({"type": "update_partial_applications", "sessionId": "abc", "timestamp": "t"})
    assert (trigger.type, trigger.session_id, trigger.event) == ("update_partial_applications", "abc", None)
    targeted = parse(
        {
            "type": "session_targeted",
            "sessionId": "abc",
            "data": {"type": "server_message", "sessionId": "abcdefghijk"},
        }
    )
    event = json.loads(targeted.event)
    assert event["type"] == "server_message" and event["sessionId"] == "abcdefgh..." and "timestamp" in event
    refresh = json.loads(parse({"type": "refresh_bookinguser", "sessionId": "abc"}).event)
    assert refresh["type"] == "refresh_bookinguser" and refresh["action"] == "refresh" and refresh["message"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"{", "not_json"),
        (b"[]", "not_object"),
        (b'{"type":"nope","sessionId":"a"}', "unknown_type"),
        (b'{"type":"update_partial_applications"}', "bad_session_id"),
        (b'{"type":"update_partial_applications","sessionId":""}', "bad_session_id"),
        (b'{"type":"update_partial_applications","sessionId":"a b"}', "bad_session_id"),
        (b'{"type":"session_targeted","sessionId":"a","data":[1]}', "bad_data"),
        (b'{"type":"session_targeted","sessionId":"a","data":{"no":"type"}}', "bad_data"),
    ],
)
def test_invalid_triggers(raw: bytes, reason: str):
    with pytest.raises(InvalidInput) as caught:
        parse_session_message(raw, 1024)
    assert caught.value.reason == reason


def test_oversized_trigger():
    with pytest.raises(InvalidInput) as caught:
        parse_session_message(b" " * 2000, 1024)
    assert caught.value.reason == "too_large"


async def test_coalescer_runs_one_more_fetch_for_triggers_during_a_fetch():
    started: list[SessionWork] = []
    gate = asyncio.Event()

    async def run(works: list[SessionWork]) -> None:
        started.extend(works)
        await gate.wait()

    coalescer = WorkCoalescer(run, concurrency=4)
    coalescer.start()
    try:
        coalescer.submit(SessionWork("s", push_all=True))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert len(started) == 1
        for token in range(5):  # arrive while the first fetch runs
            coalescer.submit(SessionWork("s", requests=[("gw", token, GET)]))
        await asyncio.sleep(0.01)
        assert len(started) == 1, "never two fetches of one session at once"
        gate.set()
        await asyncio.wait_for(coalescer.wait_idle(), 2)
        assert len(started) == 2, "exactly one follow-up fetch"
        assert [t for _, t, _ in started[1].requests] == [0, 1, 2, 3, 4]
    finally:
        await coalescer.stop()


async def test_coalescer_bounds_concurrency_across_sessions():
    running = 0
    peak = 0

    async def run(works: list[SessionWork]) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1

    coalescer = WorkCoalescer(run, concurrency=3)
    coalescer.start()
    try:
        for i in range(300):
            coalescer.submit(SessionWork(f"s{i}", push_all=True))
        await asyncio.wait_for(coalescer.wait_idle(), 5)
    finally:
        await coalescer.stop()
    assert peak == 3


async def test_coalescer_batches_a_burst_and_runs_a_lone_trigger_at_once():
    """A burst is taken in batches (one SQL statement each, in the fetcher); a lone trigger on
    an idle coalescer is not held back by the batching window; no session is in two batches
    at once, and every one runs exactly once."""
    batches: list[list[str]] = []
    in_flight: set[str] = set()
    overlaps = 0

    async def run(works: list[SessionWork]) -> None:
        nonlocal overlaps
        sids = [w.session_id for w in works]
        overlaps += len(in_flight & set(sids))
        in_flight.update(sids)
        batches.append(sids)
        await asyncio.sleep(0.005)
        in_flight.difference_update(sids)

    coalescer = WorkCoalescer(run, concurrency=4, batch_max=50, window=0.01)
    coalescer.start()
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        coalescer.submit(SessionWork("alone", push_all=True))
        await asyncio.wait_for(coalescer.wait_idle(), 2)
        assert batches == [["alone"]]
        assert loop.time() - started < 0.2, "a lone trigger does not wait for the window (10 ms)"

        batches.clear()
        for i in range(1000):
            coalescer.submit(SessionWork(f"s{i}", push_all=True))
            if i % 50 == 0:
                await asyncio.sleep(0)  # triggers arrive over time, as from a subscription
        await asyncio.wait_for(coalescer.wait_idle(), 10)
    finally:
        await coalescer.stop()
    ran = [sid for batch in batches for sid in batch]
    assert sorted(ran) == sorted(f"s{i}" for i in range(1000)), "each exactly once"
    assert max(len(b) for b in batches) == 50
    assert len(batches) <= 1000 / 10, f"batched: {len(batches)} batches for 1000 sessions"
    assert overlaps == 0


def test_one_envelope_per_gateway():
    work = SessionWork("sess-123456789", push_all=True, requests=[("gw2", 7, GET), ("gw3", 8, JOIN)])
    snapshot = CartSnapshot(seq=5, fetched_at="t", applications_json="[]", count=0)
    routed = route_cart(work, session_hash(work.session_id), ["gw1", "gw2"], snapshot)
    assert set(routed) == {"gw1", "gw2", "gw3"}
    assert routed["gw1"].push and routed["gw1"].tokens == []
    assert routed["gw2"].push and routed["gw2"].tokens == [(7, GET)]
    assert not routed["gw3"].push and routed["gw3"].tokens == [(8, JOIN)]
    assert routed["gw1"].masked_session_id == "sess-123..." and routed["gw1"].seq == 5
    # What the fetcher routes, a gateway accepts as it is (the validator on its side).
    assert decode_for_gateway(encode(routed["gw2"])) == [routed["gw2"]]


def test_a_cart_without_trigger_ignores_owners():
    work = SessionWork("s", requests=[("gw2", 1, GET)])
    routed = route_cart(work, session_hash("s"), ["gw1"], CartSnapshot(1, "t", None, error="down"))
    assert set(routed) == {"gw2"} and routed["gw2"].ok is False and routed["gw2"].error == "down"
    [decoded] = decode_for_gateway(encode(routed["gw2"]))
    assert isinstance(decoded, Cart) and decoded.error == "down" and decoded.applications is None
