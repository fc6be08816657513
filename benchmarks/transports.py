"""A Socket.IO connection beside a raw WebSocket one, on one gateway process: idle memory per
connection, and the gateway's CPU per frame pushed.

For each transport: a fresh gateway process, N idle tabs (each with its own session cookie,
Socket.IO tabs over Engine.IO's WebSocket transport), RSS before and after; then K broadcast
frames published as a fetcher does, until every tab has all of them, and the gateway's CPU
time divided by the frames written. Redis: REDIS_URL, or a throwaway local redis-server.

    .venv/bin/python -m benchmarks.transports [--tabs 1000] [--frames 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

import redis.asyncio as aioredis

from benchmarks import servers
from benchmarks.arguments import positive
from benchmarks.push import cpu_seconds, rss_kib
from services.localservers import free_port
from shared.envelopes import Event, encode
from shared.keys import Keys

FRAME = json.dumps({"type": "notification", "message": "x" * 700, "timestamp": "2026-11-27T12:00:00+00:00"})


def start_gateway(redis_url: str, port: int, prefix: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": prefix,
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "GATEWAY_ID": f"bench-{port}",
        "REQUEST_TIMEOUT_SECONDS": "0.5",
        "LOG_LEVEL": "ERROR",
        "MAX_CONNECTIONS": "100000",
    }
    process = subprocess.Popen([sys.executable, "-m", "services.gateway.main"], env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
            return process
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("gateway did not start")


class Counter:
    def __init__(self) -> None:
        self.frames = 0


async def open_tab(port: int, transport: str, i: int, counter: Counter) -> Any:
    from websockets.asyncio.client import connect

    cookie = {"Cookie": f"bookingfrontendsession=bench-{transport}-{i}"}
    if transport == "raw":
        ws = await connect(f"ws://127.0.0.1:{port}/wss", additional_headers=cookie, proxy=None)
    else:
        url = f"ws://127.0.0.1:{port}/wss/socket.io/?EIO=4&transport=websocket"
        ws = await connect(url, additional_headers=cookie, proxy=None)
        await ws.recv()  # Engine.IO open
        await ws.send("40")

    async def read() -> None:
        async for message in ws:
            text = str(message)
            if text == "2":
                await ws.send("3")  # Engine.IO pong
            elif "notification" in text[:40]:
                counter.frames += 1

    asyncio.get_running_loop().create_task(read())
    return ws


async def wait_for_frames(counter: Counter, expected: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while counter.frames < expected and time.monotonic() < deadline:  # noqa: ASYNC110 - polls a count
        await asyncio.sleep(0.05)


async def measure(transport: str, tabs: int, frames: int, redis_url: str) -> tuple[float, float]:
    port, prefix = free_port(), f"bench-transports-{transport}:"
    process = start_gateway(redis_url, port, prefix)
    try:
        await asyncio.sleep(1)
        before = rss_kib(process.pid)
        counter = Counter()
        sockets = []
        for start in range(0, tabs, 100):
            sockets += await asyncio.gather(
                *(open_tab(port, transport, i, counter) for i in range(start, min(tabs, start + 100)))
            )
        await asyncio.sleep(3)  # join-time cart requests time out (no fetcher) and are dropped
        kib = (rss_kib(process.pid) - before) / tabs
        client = aioredis.Redis.from_url(redis_url)
        envelope = encode(Event(FRAME, broadcast=True))
        cpu = cpu_seconds(process.pid)
        for _ in range(frames):
            await client.publish(Keys(prefix).gateways_channel, envelope)
            await asyncio.sleep(0.05)
        await wait_for_frames(counter, tabs * frames, 30)
        per_frame_us = (cpu_seconds(process.pid) - cpu) / max(1, counter.frames) * 1e6
        await client.aclose()
        for ws in sockets:
            await ws.close()
        if counter.frames < tabs * frames:
            raise RuntimeError(f"{transport}: {counter.frames} of {tabs * frames} frames arrived")
        return kib, per_frame_us
    finally:
        process.terminate()
        process.wait(15)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tabs", type=positive(int), default=1000)
    parser.add_argument("--frames", type=positive(int), default=20)
    args = parser.parse_args()
    with ExitStack() as cleanup:
        redis_url = servers.redis_url(cleanup)
        raw = asyncio.run(measure("raw", args.tabs, args.frames, redis_url))
        sio = asyncio.run(measure("socketio", args.tabs, args.frames, redis_url))
    print(
        f"one gateway process, {args.tabs} idle tabs, then {args.frames} pushed frames of {len(FRAME)} bytes each"
    )
    print(f"{'transport':<12} {'KiB per idle connection':>24} {'gateway CPU per frame pushed':>30}")
    for name, (kib, us) in (("raw", raw), ("socket.io", sio)):
        print(f"{name:<12} {kib:>24.1f} {us:>27.1f} µs")
    print(f"socket.io / raw: memory x{sio[0] / raw[0]:.2f}, push cost x{sio[1] / raw[1]:.2f}")


if __name__ == "__main__":
    main()
