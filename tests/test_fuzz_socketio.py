"""Seeded fuzzing of the Socket.IO endpoint: malformed Engine.IO and Socket.IO input over both
transports (WebSocket frames, polling POST bodies, query strings) from hostile connections,
while a Socket.IO bystander of another session stays connected. No process dies (the suite's
`no_background_task_died` fixture), the bystander is never disconnected and still gets its
pushes, and the gateway holds no leftover Engine.IO session afterwards."""

from __future__ import annotations

import asyncio
import logging
import random
import shutil

import httpx
import pytest
import websockets

from tests.support.data import add_application
from tests.support.stack import Stack, trigger
from tests.support.waiting import eventually

pytestmark = [
    pytest.mark.anyio,
    pytest.mark.chaos,
    pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (Debian's nodejs and npm)"),
]

SEED = 20261127
BYSTANDER = "sioBystanderSession1"
PIECES = [
    "0",
    "1",
    "2",
    "3",
    "4",
    "5",
    "6",
    "2probe",
    "40",
    "41",
    "42",
    "43",
    "44",
    "45",
    "46",
    "/",
    "/x,",
    ",",
    "-",
    "1-",
    "99-",
    "[",
    "]",
    "{",
    "}",
    '"message"',
    '"x"',
    "null",
    "NaN",
    '"\\ud800"',
    "123456789012345678901",
    '{"_placeholder":true,"num":5}',
    "\x1e",
    "b",
    "bAAA",
    "\u00b2",  # "²": str.isdigit() says yes, int() says no
    "\u0663",  # "٣", an Arabic-Indic digit: int() takes it
]


def garbage(rng: random.Random) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randrange(1, 8)))


@pytest.mark.parametrize("extra", [[], ["\u00b2"], ["\u0663"]])
def test_the_packet_decoder_raises_only_its_own_error(extra):
    """`socketio.decode` on anything: a packet or `PacketError`, never another exception (a
    ValueError from `int("²")` closed the session as a "transport error", and would have
    escaped wherever the caller expects only PacketError). Unicode digits are not digits."""
    from services.gateway.socketio import PacketError, decode

    rng = random.Random(SEED)
    for _ in range(20_000):
        text = garbage(rng)
        if extra and rng.random() < 0.5:
            at = rng.randrange(len(text) + 1)
            text = text[:at] + extra[0] + text[at:]
        try:
            packet = decode(text)
        except PacketError:
            continue
        assert text[0] in "0123456" and (packet.ack_id is None or str(packet.ack_id) in text), text


async def test_malformed_socketio_input_disturbs_nobody(stack: Stack, db, redis_url, caplog):
    from tests.support.sio_tabs import SioTab

    await add_application(db, BYSTANDER)
    # Short Socket.IO timers: a hostile polling session that never connected, or that no longer
    # polls, is gone within seconds, whatever garbage the seed happened to send it.
    gateway = await stack.add_gateway(
        socketio_connect_timeout_seconds=1.0,
        socketio_ping_interval_seconds=1.0,
        socketio_ping_timeout_seconds=1.0,
    )
    bystander = await SioTab.open(gateway.http, session=BYSTANDER, transports="websocket")
    rng = random.Random(SEED)
    sent = 0
    try:
        await bystander.wait_for("partial_applications_response")
        ws_url = f"ws://127.0.0.1:{gateway.port}/socket.io/?EIO=4&transport=websocket"
        for _ in range(40):  # WebSocket: a handshake, sometimes a CONNECT, then garbage
            async with websockets.connect(ws_url, proxy=None) as ws:
                await ws.recv()
                if rng.random() < 0.7:
                    await ws.send("40")
                for _ in range(rng.randrange(1, 30)):
                    frame = garbage(rng)
                    await ws.send(frame.encode() if rng.random() < 0.1 else frame)
                    sent += 1
        async with httpx.AsyncClient(base_url=gateway.http) as client:
            for _ in range(60):  # polling: a handshake, then garbage bodies and queries
                opened = await client.get("/socket.io/?EIO=4&transport=polling")
                sid = opened.text[1:].split('"sid":"')[1].split('"')[0]
                for _ in range(rng.randrange(1, 10)):
                    query = rng.choice(
                        [f"sid={sid}", f"sid={sid}&EIO=3", "sid=nope", f"sid={sid}&transport=x"]
                    )
                    response = await client.post(
                        f"/socket.io/?EIO=4&transport=polling&{query}",
                        content=garbage(rng).encode("utf-8", "surrogatepass"),
                    )
                    assert response.status_code in (200, 400, 413)
                    sent += 1
        print(f"{sent} malformed inputs sent")
        await add_application(db, BYSTANDER)
        await trigger(redis_url, BYSTANDER)
        await eventually(
            lambda: any(
                m["data"].get("count") == 2 for m in bystander.messages("partial_applications_response")
            ),
            10,
            what="the bystander's push",
        )
        assert bystander.of("disconnect") == []
        # every hostile session ended: only the bystander's is left
        await eventually(
            lambda: len(gateway.socketio.engine.sessions) == 1, 10, what="hostile sessions closed"
        )
        errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert errors == [], "no input may raise inside the gateway (uvicorn logs those as errors)"
    finally:
        await bystander.close()
    await asyncio.sleep(0)
