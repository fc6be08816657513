"""Hardening, round 3: one slow tab must not cost others their carts (each test tells the bug's
story). Real gateways, fetchers, Redis and PostgreSQL; the slow tab is a Socket.IO polling tab
that stopped polling, as a backgrounded browser tab does."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from shared.envelopes import MAX_MESSAGE_BYTES
from shared.keys import SESSION_MESSAGES_CHANNEL, Keys
from tests.support.data import add_application, seed_reference
from tests.support.metrics import metric_value
from tests.support.stack import running_stack, trigger
from tests.support.tabs import Tab
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

A, B, C, X = "fanoutSessionA", "fanoutSessionB", "fanoutSessionC", "fanoutSessionX"


async def silent_polling_tab(http: str, session: str) -> str:
    """A Socket.IO tab that connects over polling, then never polls again."""
    base = f"{http}/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient(cookies={"bookingfrontendsession": session}) as client:
        sid = json.loads((await client.get(base)).text[1:])["sid"]
        assert (await client.post(f"{base}&sid={sid}", content="40")).status_code == 200
    return str(sid)


def targeted(session: str, n: int, pad: int = 0) -> str:
    data = {
        "type": "server_message",
        "action": "new",
        "messages": [{"id": n, "type": "info", "text": "x" * pad}],
    }
    return json.dumps({"type": "session_targeted", "sessionId": session, "data": data})


async def test_a_drop_during_a_fanout_costs_nobody_else_their_push(redis_url, database_url, prefix, db):
    """Bug: the fan-out iterated the live set of a session's tabs; a full outbox drops its tab,
    which took it out of that set: "Set changed size during iteration", and the rest of that
    Redis message was discarded. Reproduced as reported: a fetcher with FETCH_CONCURRENCY=1 held
    by a locked table while 100 `session_targeted` for A and cart changes for B and C arrive;
    the next message is [A x 100, B, C], and B and C got 0 of 2 pushes, for good. Also: a tab of
    A that reads everything was dropped as a slow consumer (1013), because its writer could not
    run while one message held more than OUTBOX_FRAMES for it (0 of 100 received).
    Now: the tab that reads gets all 100; the tab that does not is dropped; B and C get theirs."""
    await seed_reference(db)
    async with running_stack(redis_url, database_url, prefix, gateways=0, fetchers=0) as stack:
        await stack.add_fetcher(fetch_concurrency=1, db_pool_size=2)
        gateway = await stack.add_gateway(outbox_frames=4)
        await stack.wait_shards_settled()
        for session in (B, C, X):
            await add_application(db, session)
        reader = await Tab.open(gateway.url, session=A)
        tabs = {s: await Tab.open(gateway.url, session=s) for s in (B, C, X)}
        for tab in (reader, *tabs.values()):
            await tab.wait_pushes(1)
        silent = await silent_polling_tab(gateway.http, A)
        await eventually(lambda: len(gateway.gateway.tabs) == 5, 5, what="5 tabs")
        for session in (B, C):
            await add_application(db, session)
        lock = await asyncpg.connect(database_url)
        transaction = lock.transaction()
        await transaction.start()
        await lock.execute("LOCK TABLE bb_application IN ACCESS EXCLUSIVE MODE")
        try:
            await trigger(redis_url, X)  # the fetcher's one worker now waits for the lock
            await asyncio.sleep(0.2)
            client = aioredis.Redis.from_url(redis_url)
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for n in range(100):
                        pipe.publish(SESSION_MESSAGES_CHANNEL, targeted(A, n))
                    for session in (B, C):
                        payload = {"type": "update_partial_applications", "sessionId": session}
                        pipe.publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))
                    await pipe.execute()
            finally:
                await client.aclose()
            await asyncio.sleep(0.8)
        finally:
            await transaction.rollback()
            await lock.close()
        for session in (B, C):
            await eventually(
                lambda s=session: tabs[s].pushes()[-1]["data"]["count"] == 2, 10, what=f"{session}'s push"
            )
        await eventually(
            lambda: len(reader.of_type("server_message")) == 100, 10, what="all 100 for the reader"
        )
        assert [m["messages"][0]["id"] for m in reader.of_type("server_message")] == list(range(100))
        assert reader.closed_code is None
        # Dropped: its Engine.IO session closed (kept a moment for a last poll, then forgotten).
        await eventually(
            lambda: silent not in gateway.socketio.engine.sessions, 10, what="the silent tab dropped"
        )
        assert metric_value(gateway.gateway.metrics.slow_consumers, action="closed") == 1


async def test_a_slow_member_of_a_session_never_closes_the_tab_that_relays_to_it(stack, db):
    """Bug: in a relay the same "Set changed size during iteration" escaped into the *sender's*
    loop, which was closed 1011: 11 raw tabs relaying to a session whose Socket.IO polling tab
    stopped polling, and a sender was closed. Now the slow tab is dropped and no sender is.
    (18 rounds: the silent tab overflows after 128 Engine.IO packets and 64 in its outbox.)"""
    gateway = await stack.add_gateway()
    senders = [await Tab.open(gateway.url, session=A) for _ in range(11)]
    for tab in senders:
        await tab.wait_for("connection_success")
    silent = await silent_polling_tab(gateway.http, A)
    rounds = 18
    for round_ in range(rounds):
        for n, tab in enumerate(senders):
            await tab.send({"type": "session_message", "text": f"{round_}-{n}"})
    expected = (len(senders) - 1) * rounds
    for tab in senders:
        await eventually(lambda tab=tab: len(tab.of_type("room_message")) == expected, 15, what="the others'")
        assert tab.closed_code is None
    await eventually(
        lambda: silent not in gateway.socketio.engine.sessions, 10, what="the silent tab dropped"
    )
    assert metric_value(gateway.gateway.metrics.slow_consumers, action="closed") == 1


async def test_a_sessions_queue_is_bounded_and_no_message_outgrows_redis(redis_url, database_url, prefix, db):
    """Bug: batches were split by a guess of 200 bytes per event whatever its size, and a
    session's waiting work merged events without bound: 40 `session_targeted` of 1000 KiB for
    one session (each under MAX_PAYLOAD_BYTES) left as one ~36 MiB message, Redis' default
    `client-output-buffer-limit pubsub 32mb` disconnected the gateway's subscription: 0 of 40
    delivered, and every event for that gateway until it resubscribed was lost too. Now a lane
    keeps its newest events within 4 MiB, no message on a gateway's channel is over 4 MiB, the
    subscription stays up, and a later event for another session arrives."""
    await seed_reference(db)
    async with running_stack(redis_url, database_url, prefix, gateways=0, fetchers=0) as stack:
        fetcher = await stack.add_fetcher(fetch_concurrency=1, db_pool_size=2)
        gateway = await stack.add_gateway()
        await stack.wait_shards_settled()
        await add_application(db, X)
        tab_a, tab_b, tab_x = [await Tab.open(gateway.url, session=s) for s in (A, B, X)]
        for tab in (tab_a, tab_b, tab_x):
            await tab.wait_pushes(1)
        sizes: list[int] = []
        probe = aioredis.Redis.from_url(redis_url)
        pubsub = probe.pubsub()
        await pubsub.subscribe(Keys(prefix).gateway_channel(gateway.gateway.id))

        async def watch() -> None:
            while True:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1)
                if message:
                    sizes.append(len(message["data"]))

        watcher = asyncio.create_task(watch())
        reconnects = gateway.gateway.subscription.reconnects
        lock = await asyncpg.connect(database_url)
        transaction = lock.transaction()
        await transaction.start()
        await lock.execute("LOCK TABLE bb_application IN ACCESS EXCLUSIVE MODE")
        client = aioredis.Redis.from_url(redis_url)
        try:
            await trigger(redis_url, X)  # the worker waits for the lock; A's events pile up
            await asyncio.sleep(0.2)
            for n in range(40):
                await client.publish(SESSION_MESSAGES_CHANNEL, targeted(A, n, pad=1000 * 1024 - 300))
            await asyncio.sleep(0.8)
        finally:
            await transaction.rollback()
            await lock.close()
        try:
            await eventually(lambda: len(tab_a.of_type("server_message")) >= 3, 20, what="the newest events")
            received = [m["messages"][0]["id"] for m in tab_a.of_type("server_message")]
            assert received == sorted(received) and received[-1] == 39, "the newest are kept, in order"
            assert metric_value(fetcher.metrics.events_dropped) == 40 - len(received)
            await client.publish(SESSION_MESSAGES_CHANNEL, targeted(B, 1))
            await tab_b.wait_for("server_message")
        finally:
            await client.aclose()
            watcher.cancel()
            await pubsub.aclose()
            await probe.aclose()
        assert gateway.gateway.subscription.reconnects == reconnects, "the subscription stayed up"
        assert sizes and max(sizes) <= MAX_MESSAGE_BYTES, max(sizes)
