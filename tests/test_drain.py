"""Rolling deploy: SIGTERM a real gateway process holding N tabs."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

from services.localservers import free_port
from tests.support.data import add_application
from tests.support.stack import Stack, trigger
from tests.support.tabs import ReconnectingTab
from tests.support.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

TABS = 20
DRAIN_SECONDS = 3.0


def start_gateway_process(stack: Stack) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    env = {
        **os.environ,
        "REDIS_URL": stack.redis_url,
        "REDIS_PREFIX": stack.prefix,
        "GATEWAY_ID": "gw-a",
        "GATEWAY_HOST": "127.0.0.1",
        "GATEWAY_PORT": str(port),
        "DRAIN_SECONDS": str(DRAIN_SECONDS),
        "OWNERSHIP_TTL_SECONDS": "3",
        "LOG_LEVEL": "WARNING",
    }
    binary = os.path.join(os.path.dirname(sys.executable), "portico-gateway")
    process = subprocess.Popen([binary], env=env)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise AssertionError("gateway process did not become ready")


async def test_sigterm_drains_tabs_to_another_gateway_without_losing_a_push(stack: Stack, db, redis_url):
    """N tabs on gateway A; SIGTERM A. A turns not-ready, spreads the tabs' reconnects over its
    drain window, and exits; every tab lands on B within the window, and a cart change
    published in the middle of the drain reaches every one of them."""
    sessions = [f"drain-session-{i}" for i in range(TABS)]
    for sid in sessions:
        await add_application(db, sid)
    process, port = start_gateway_process(stack)
    url_a = f"ws://127.0.0.1:{port}/wss"
    url_b = stack.gateways[0].url
    tabs = []
    try:
        for sid in sessions:
            tabs.append(await ReconnectingTab([url_a, url_b], sid).start())
        assert all(t.connected_to == url_a for t in tabs)
        await eventually(lambda: all(t.last_cart_count() == 1 for t in tabs), what="join carts")

        started = asyncio.get_running_loop().time()
        process.send_signal(signal.SIGTERM)
        await eventually(lambda: _not_ready(port), 5, what="A not ready")
        await asyncio.sleep(DRAIN_SECONDS / 2)  # mid-drain: some tabs moved, some not yet
        moved = sum(t.connected_to == url_b for t in tabs)
        for sid in sessions:
            await add_application(db, sid)
            await trigger(redis_url, sid)

        exit_code = await asyncio.to_thread(process.wait, 30)
        # uvicorn re-raises the caught SIGTERM after its graceful shutdown.
        assert exit_code in (0, -signal.SIGTERM)
        exited_after = asyncio.get_running_loop().time() - started
        assert exited_after < DRAIN_SECONDS + 10, "exits well before a 30 s grace period"

        await eventually(
            lambda: all(t.connected_to == url_b for t in tabs), 2 * DRAIN_SECONDS + 5, what="all on B"
        )
        await eventually(
            lambda: all(t.last_cart_count() == 2 for t in tabs), 10, what="mid-drain push everywhere"
        )
        arrivals = [next(at for at, url in t.connects if url == url_b) - started for t in tabs]
        assert 0 < moved < TABS, f"reconnects are paced, not all-at-once ({moved} moved at half-time)"
        assert max(arrivals) - min(arrivals) > DRAIN_SECONDS / 3, "arrivals on B spread over the window"
        assert max(arrivals) < DRAIN_SECONDS + 2
        assert all(any(f.get("type") == "reconnect_required" for f in t.frames) for t in tabs)
    finally:
        for tab in tabs:
            await tab.stop()
        if process.poll() is None:
            process.kill()


def _not_ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
            return False
    except urllib.error.HTTPError as refused:
        return refused.code == 503
    except OSError:
        return True  # already stopped listening
