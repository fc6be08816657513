"""Idle memory per WebSocket connection on one gateway, per WebSocket implementation.

For each configuration: start a gateway process, measure its RSS, open N idle tabs (each with
its own session cookie, so each also registers a session), wait for things to settle, measure
again. Prints KiB per connection and the ratio against the chosen default (websockets-sansio,
no permessage-deflate) measured in the same run.

    .venv/bin/python -m benchmarks.idle_memory [--connections 2000]

Redis: REDIS_URL, or a throwaway local redis-server. No fetcher runs (join-time cart requests
time out and are dropped before the measurement), so only the gateway's own memory is counted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import subprocess
import sys
import time
import urllib.request
from contextlib import ExitStack
from typing import Any

from benchmarks import servers
from benchmarks.arguments import positive
from services.localservers import free_port

CONFIGS = [
    ("websockets-sansio", False),
    ("websockets-sansio", True),
    ("websockets", False),
    ("websockets", True),
]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def open_tabs(url: str, count: int) -> list[Any]:
    from websockets.asyncio.client import connect

    tabs = []
    for i in range(count):
        ws = await connect(
            url,
            additional_headers={"Cookie": f"bookingfrontendsession=bench-{i}"},
            proxy=None,
            compression="deflate",
        )
        tabs.append(ws)
    for ws in tabs[:5]:
        await asyncio.wait_for(ws.recv(), 5)  # connection_success: the socket is fully set up
    return tabs


def measure(impl: str, deflate: bool, connections: int, redis_url: str) -> tuple[int, int]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": redis_url,
        "REDIS_PREFIX": f"bench:{port}:",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "WS_PER_MESSAGE_DEFLATE": "true" if deflate else "false",
        "REQUEST_TIMEOUT_SECONDS": "0.5",
        "LOG_LEVEL": "ERROR",
        "BENCH_WS_IMPL": impl,
    }
    code = (
        "import uvicorn; from shared.settings import GatewaySettings; from services.gateway.main import uvicorn_config;"
        "import os, resource; s = GatewaySettings.from_env();"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],)*2);"
        "uvicorn.Server(uvicorn_config(s, ws=os.environ['BENCH_WS_IMPL'])).run()"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1)
        before = rss_kib(proc.pid)

        async def hold() -> int:
            tabs = await open_tabs(f"ws://127.0.0.1:{port}/wss", connections)
            await asyncio.sleep(3)  # join requests time out (3 x 0.5 s) and are dropped
            after = rss_kib(proc.pid)
            for ws in tabs:
                await ws.close()
            return after

        after = asyncio.run(hold())
        return before, after
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=positive(int), default=2000)
    args = parser.parse_args()
    raise_fd_limit()
    with ExitStack() as cleanup:
        redis_url = servers.redis_url(cleanup)
        results = []
        for impl, deflate in CONFIGS:
            before, after = measure(impl, deflate, args.connections, redis_url)
            per = (after - before) / args.connections
            results.append((impl, deflate, before, after, per))
        baseline = results[0][4]
        print(f"idle RSS per connection, {args.connections} idle tabs with sessions, one gateway process")
        print(
            f"{'implementation':<20} {'deflate':<8} {'RSS before':>11} {'RSS after':>10} {'KiB/conn':>9} {'vs default':>10}"
        )
        for impl, deflate, before, after, per in results:
            print(
                f"{impl:<20} {('on' if deflate else 'off'):<8} {before:>8} KiB {after:>6} KiB {per:>9.1f} {per / baseline:>9.2f}x"
            )


if __name__ == "__main__":
    main()
