"""Socket.IO keeps every limit a raw tab has (hardening, round 3). Each test tells the bug's story.

The attacks are made at the Engine.IO and Socket.IO packet level, as a hostile client would send
them, against real gateways and fetchers on real Redis and PostgreSQL.
"""

from __future__ import annotations

import asyncio
import base64
import json
import socket

import httpx
import pytest
import redis.asyncio as aioredis
import websockets

from shared.keys import NOTIFICATIONS_CHANNEL
from tests.support.metrics import metric_value
from tests.support.stack import Stack
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

SEP = "\x1e"


def joins_served(stack: Stack) -> float:
    return sum(metric_value(f.metrics.requests, kind="join") for f in stack.fetchers)


def polling_url(stack: Stack, gateway: int = 0) -> str:
    return f"http://127.0.0.1:{stack.gateways[gateway].port}/socket.io/?EIO=4&transport=polling"


def websocket_url(stack: Stack, gateway: int = 0) -> str:
    return f"ws://127.0.0.1:{stack.gateways[gateway].port}/socket.io/?EIO=4&transport=websocket"


def update_session(n: int) -> str:
    return "42" + json.dumps(["message", {"type": "update_session", "sessionId": f"madeUpSession{n:04d}"}])


async def test_a_namespace_reconnect_keeps_the_connections_budgets_over_websocket(small_stack: Stack):
    """Bug: `41` then `40` on one Engine.IO session made a fresh protocol with fresh token
    buckets: one connection sent 150 `update_session` to new ids in 0.4 s, got no RATE_LIMITED,
    and cost 150 cart reads, 150 seq keys and 150 snapshots. A raw socket is closed after its 3rd
    new id. Budgets now belong to the connection: after at most 3 new ids, RATE_LIMITED and the
    Engine.IO session is closed; at most 3 cart reads. (40 rounds, 121 packets: within Engine.IO's
    packet budget of 200, which would otherwise close the session first, with nothing said.)"""
    before = joins_served(small_stack)
    received: list[str] = []
    async with websockets.connect(websocket_url(small_stack), proxy=None) as ws:
        assert str(await asyncio.wait_for(ws.recv(), 5)).startswith("0{")

        async def read() -> None:
            # Read while sending: the gateway may close the session before the last send.
            try:
                async for frame in ws:
                    received.append(str(frame))
            except websockets.ConnectionClosed:
                pass

        reader = asyncio.create_task(read())
        await ws.send("40")
        try:
            for n in range(40):
                await ws.send(update_session(n))
                await ws.send("41")
                await ws.send("40")
        except websockets.ConnectionClosed:
            pass
        await asyncio.wait_for(reader, 10)
        assert ws.close_code is not None
    assert any('"RATE_LIMITED"' in frame for frame in received), received[-5:]
    await asyncio.sleep(1)  # any cart request still on its way
    assert joins_served(small_stack) - before <= 3


async def test_a_namespace_reconnect_keeps_the_connections_budgets_over_polling(small_stack: Stack):
    """The same over HTTP long-polling (0.7 s for the 150 before): RATE_LIMITED reaches the tab in
    a poll, and the Engine.IO session is gone."""
    before = joins_served(small_stack)
    base = polling_url(small_stack)
    async with httpx.AsyncClient() as client:
        opened = await client.get(base)
        sid = json.loads(opened.text[1:])["sid"]
        url = f"{base}&sid={sid}"
        assert (await client.post(url, content="40")).status_code == 200
        payloads: list[str] = []
        for n in range(150):
            posted = await client.post(url, content=SEP.join([update_session(n), "41", "40"]))
            if posted.status_code != 200:
                break
        for _ in range(20):
            poll = await client.get(url, timeout=5)
            if poll.status_code != 200:
                break
            payloads.append(poll.text)
            if poll.text.endswith("1"):  # the close packet: the session is over
                break
        assert any('"RATE_LIMITED"' in payload for payload in payloads), payloads[-3:]
        assert (await client.get(url)).status_code == 400, "the session is closed"
    await asyncio.sleep(1)
    assert joins_served(small_stack) - before <= 3
    await eventually(lambda: not small_stack.gateways[0].socketio.engine.sessions, 5)


def masked_text_frame(text: str) -> bytes:
    """One client WebSocket text frame (clients must mask), built by hand for a raw socket."""
    payload = text.encode()
    mask = b"\x01\x02\x03\x04"
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    assert len(payload) < 126
    return bytes([0x81, 0x80 | len(payload)]) + mask + masked


async def raw_connection(port: int, request: bytes) -> socket.socket:
    """A TCP connection with a tiny receive buffer, that the test then stops reading."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    await asyncio.get_running_loop().sock_sendall(sock, request)
    return sock


async def ends_within(sock: socket.socket, seconds: float) -> tuple[bool, int]:
    """Read what is there: (the server ended the connection within `seconds`, bytes read)."""
    received = 0
    try:
        async with asyncio.timeout(seconds):
            while chunk := await asyncio.get_running_loop().sock_recv(sock, 1 << 20):
                received += len(chunk)
        return True, received
    except ConnectionResetError:
        return True, received
    except TimeoutError:
        return False, received


async def flood_broadcasts(redis_url: str, count: int = 200) -> None:
    client = aioredis.Redis.from_url(redis_url)
    try:
        big = json.dumps({"type": "notification", "pad": "x" * 60000})
        async with client.pipeline(transaction=False) as pipe:
            for _ in range(count):
                pipe.publish(NOTIFICATIONS_CHANNEL, big)
            await pipe.execute()
    finally:
        await client.aclose()


async def test_a_socketio_websocket_whose_peer_stops_reading_is_aborted(small_stack: Stack, redis_url):
    """Bug: a Socket.IO WebSocket whose peer stopped reading was never aborted: its session
    ended (outgoing buffer full), but the TCP connection stayed ESTABLISHED with 2.8 MB queued
    two minutes later, outside every gauge and the connection cap (the raw-socket fix of the
    last round did not cover Engine.IO's own writes). Now released within the write deadline."""
    running = await small_stack.add_gateway(socketio_ping_timeout_seconds=2.0)
    request = (
        b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    sock = await raw_connection(running.port, request)
    try:
        opened = b""
        while b'0{"sid"' not in opened:  # the 101 and the Engine.IO open: then the client speaks
            opened += await asyncio.wait_for(asyncio.get_running_loop().sock_recv(sock, 4096), 5)
        await asyncio.get_running_loop().sock_sendall(sock, masked_text_frame("40"))
        await eventually(lambda: len(running.gateway.tabs) == 1, 5, what="connected to Socket.IO")
        await flood_broadcasts(redis_url)  # ~12 MB that nobody reads
        await eventually(lambda: not running.socketio.engine.sessions and not running.gateway.tabs, 15)
        await asyncio.sleep(2.0 + 3)  # the write deadline (2 s here) and a margin
        ended, received = await ends_within(sock, 3)
    finally:
        sock.close()
    assert ended, "the connection was still open after its session ended"
    assert received < 12_000_000


async def test_a_poll_response_whose_peer_stops_reading_is_aborted(small_stack: Stack, redis_url):
    """The same for HTTP long-polling: a poll's response of megabytes to a peer that does not
    read waited for ever. Now it is aborted after the write deadline."""
    running = await small_stack.add_gateway(socketio_ping_timeout_seconds=2.0, outbox_frames=64)
    base = f"http://127.0.0.1:{running.port}/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient() as client:
        sid = json.loads((await client.get(base)).text[1:])["sid"]
        assert (await client.post(f"{base}&sid={sid}", content="40")).status_code == 200
        assert (await client.get(f"{base}&sid={sid}")).status_code == 200  # the CONNECT reply
    # 100 events of 60 KB: queued for the next poll (under the slow-consumer bound, 128 packets
    # with OUTBOX_FRAMES 64), so that poll's response is over 6 MB.
    await flood_broadcasts(redis_url, 100)
    await asyncio.sleep(0.5)
    path = f"/socket.io/?EIO=4&transport=polling&sid={sid}".encode()
    sock = await raw_connection(running.port, b"GET " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    try:
        await asyncio.sleep(2.0 + 3)
        ended, received = await ends_within(sock, 3)
    finally:
        sock.close()
    assert ended, "the poll's connection was still open"
    assert received < 100 * 60_000, "cut off, not sent whole"


async def test_pending_binary_attachments_are_bounded(small_stack: Stack):
    """Bug: an unfinished `51-` ... `510-` event kept up to 9 attachments (about 440 KiB) per
    Engine.IO session, before any CONNECT, kept alive by pongs: 100 sessions from one keep-alive
    connection grew the gateway by 43 MiB (about 2,300 would OOM-kill a 1 GiB pod). A binary
    packet before CONNECT now closes its session at once; after CONNECT, its attachments are
    bounded in size and must all arrive within the attachment timeout."""
    running = await small_stack.add_gateway(socketio_ping_timeout_seconds=2.0)
    base = f"http://127.0.0.1:{running.port}/socket.io/?EIO=4&transport=polling"
    attachment = "b" + base64.b64encode(b"\x00" * 40_000).decode()
    async with httpx.AsyncClient() as client:
        refused = 0
        for _ in range(30):  # before any CONNECT
            sid = json.loads((await client.get(base)).text[1:])["sid"]
            packet = (
                '459-["message",' + ",".join(f'{{"_placeholder":true,"num":{n}}}' for n in range(9)) + "]"
            )
            await client.post(f"{base}&sid={sid}", content=SEP.join([packet, attachment]))
            refused += sid not in running.socketio.engine.sessions
        assert refused == 30
        assert not running.socketio.engine.sessions, "every such session is closed at once"
        # After a CONNECT: attachments over a frame's worth are refused; a packet left
        # unfinished is given up after the attachment timeout (2 s here).
        too_big = json.loads((await client.get(base)).text[1:])["sid"]
        assert (await client.post(f"{base}&sid={too_big}", content="40")).status_code == 200
        posted = await client.post(
            f"{base}&sid={too_big}",
            content=SEP.join(['452-["message",{"_placeholder":true,"num":0}]', attachment]),
        )
        posted = await client.post(f"{base}&sid={too_big}", content=attachment)
        assert posted.status_code in (200, 400)
        assert too_big not in running.socketio.engine.sessions, (
            "80 KB of attachments for a 64 KiB frame limit"
        )
        waiting = json.loads((await client.get(base)).text[1:])["sid"]
        assert (await client.post(f"{base}&sid={waiting}", content="40")).status_code == 200
        small = "b" + base64.b64encode(b"\x00" * 100).decode()
        packet = '452-["message",{"_placeholder":true,"num":0},{"_placeholder":true,"num":1}]'
        assert (
            await client.post(f"{base}&sid={waiting}", content=SEP.join([packet, small]))
        ).status_code == 200
        await eventually(lambda: waiting not in running.socketio.engine.sessions, 2.0 + 3, what="given up")


async def test_a_flood_of_engineio_packets_is_refused(small_stack: Stack):
    """Bug: Engine.IO packets had no budget: one 64 KiB POST carried 32,500 noops (about 20 ms
    of event loop), and two clients posting in a loop raised a bystander's ping->pong from 1.1 ms
    to 31.9 ms median. A POST of more than 100 packets is refused before one is handled, and
    every packet spends its session's budget; the flooders' sessions are closed."""
    base = polling_url(small_stack)
    latencies: list[float] = []
    async with httpx.AsyncClient() as client:
        flooders = [json.loads((await client.get(base)).text[1:])["sid"] for _ in range(2)]
        url = websocket_url(small_stack)
        async with websockets.connect(url, proxy=None) as bystander:
            await bystander.recv()
            await bystander.send("40")
            await bystander.recv()

            async def flood(sid: str) -> list[int]:
                statuses = []
                for _ in range(20):
                    posted = await client.post(f"{base}&sid={sid}", content=SEP.join(["6"] * 32_000))
                    statuses.append(posted.status_code)
                return statuses

            async def ping() -> None:
                loop = asyncio.get_running_loop()
                for n in range(50):
                    started = loop.time()
                    await bystander.send(f'42["message",{{"type":"ping","id":"b{n}"}}]')
                    while '"pong"' not in str(await bystander.recv()):
                        pass
                    latencies.append(loop.time() - started)
                    await asyncio.sleep(0.01)

            floods = await asyncio.gather(flood(flooders[0]), flood(flooders[1]), ping())
        # Fewer than 100 packets in one POST are fine; the budget refills.
        sid = json.loads((await client.get(base)).text[1:])["sid"]
        assert (await client.post(f"{base}&sid={sid}", content=SEP.join(["6"] * 50))).status_code == 200
    latencies.sort()
    print(
        f"\nbystander ping->pong during the flood: median {latencies[25] * 1000:.1f} ms, max {latencies[-1] * 1000:.1f} ms"
    )
    for statuses in floods[:2]:
        assert statuses and all(status == 400 for status in statuses), statuses[:5]
    assert not any(s in small_stack.gateways[0].socketio.engine.sessions for s in flooders)


@pytest.mark.parametrize("transport", ["websocket", "polling"])
async def test_a_tab_past_its_budget_is_told_so_before_it_is_closed(small_stack: Stack, transport: str):
    """Bug: closing a Socket.IO session discarded its queue: a tab past its budget got 35 of 60
    pongs and no RATE_LIMITED over WebSocket, and nothing at all over polling. What was queued
    before the close now goes out first: every pong within the budget, then RATE_LIMITED."""
    pings = [f'42["message",{{"type":"ping","id":"p{n}"}}]' for n in range(80)]
    if transport == "websocket":
        received: list[str] = []
        async with websockets.connect(websocket_url(small_stack), proxy=None) as ws:
            await ws.recv()
            await ws.send("40")
            for text in pings:
                await ws.send(text)
            try:
                async for frame in ws:
                    received.append(str(frame))
            except websockets.ConnectionClosed:
                pass
        text = "".join(received)
    else:
        base = polling_url(small_stack)
        payloads = []
        async with httpx.AsyncClient() as client:
            sid = json.loads((await client.get(base)).text[1:])["sid"]
            url = f"{base}&sid={sid}"
            await client.post(url, content="40")
            for start in range(0, 80, 20):
                await client.post(url, content=SEP.join(pings[start : start + 20]))
            for _ in range(20):
                poll = await client.get(url, timeout=5)
                if poll.status_code != 200:
                    break
                payloads.append(poll.text)
                if poll.text.endswith(SEP + "1") or poll.text == "1":
                    break
        text = SEP.join(payloads)
    assert text.count('"type":"pong"') == 60, "every ping within the budget (60) was answered"
    assert '"RATE_LIMITED"' in text


async def test_both_transports_count_together_against_the_connection_cap(small_stack: Stack):
    """Bug: MAX_CONNECTIONS compared the larger of two counts, not their sum: capped at 10, a
    gateway held 20 (10 bare Engine.IO sessions and 10 raw sockets)."""
    from tests.support.tabs import Tab

    running = await small_stack.add_gateway(max_connections=4)
    base = f"http://127.0.0.1:{running.port}/socket.io/?EIO=4&transport=polling"
    async with httpx.AsyncClient() as client:
        assert [(await client.get(base)).status_code for _ in range(2)] == [200, 200]
        tabs = [await Tab.open(running.url, session=f"capSession{n:04d}") for n in range(2)]
        try:
            with pytest.raises(websockets.InvalidStatus) as refused:
                await Tab.open(running.url, session="capSession9999")
            assert refused.value.response.status_code == 503
            assert (await client.get(base)).status_code == 503
        finally:
            for tab in tabs:
                await tab.close()
    await eventually(
        lambda: running.gateway.connection_count() == 2, 5, what="the tabs gone, the bare sessions kept"
    )
