"""Compose's nginx (`deploy/compose/nginx.conf`), run for real in front of two gateways.

Socket.IO's long-polling needs every request of an Engine.IO session on the gateway process
that holds it; the config routes the Socket.IO paths on the cookie the gateways set on the
polling handshake (`SOCKETIO_AFFINITY_COOKIE`), and spreads the raw WebSocket path freely. The
config file is the one compose uses, with only its addresses replaced by this test's.

Needs nginx (Debian's `nginx-light`; `.ci/run` installs it).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from services.localservers import free_port
from tests.support.data import add_application
from tests.support.stack import Stack, trigger
from tests.support.tabs import Tab
from tests.support.waiting import eventually

NGINX = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin")  # not on a user's PATH
pytestmark = [
    pytest.mark.anyio,
    pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian's nginx-light)"),
]

NGINX_CONF = Path(__file__).resolve().parent.parent / "deploy" / "compose" / "nginx.conf"
SESSIONS = [f"proxiedSession{i:04d}" for i in range(12)]


@pytest.fixture
async def gateways(stack: Stack) -> AsyncIterator[dict[str, int]]:
    """Two more gateways named as compose names them, each setting the affinity cookie."""
    ports = {}
    for name in ("gateway-1", "gateway-2"):
        running = await stack.add_gateway(gateway_id=name, socketio_affinity_cookie="portico_gateway")
        ports[name] = running.port
    yield ports


@pytest.fixture
async def nginx(gateways: dict[str, int], tmp_path: Path) -> AsyncIterator[str]:
    conf = NGINX_CONF.read_text()
    for name, port in gateways.items():
        conf = conf.replace(f"{name}:8080", f"127.0.0.1:{port}")
    conf = conf.replace("demo:8000", f"127.0.0.1:{free_port()}")  # the demo page is not needed here
    port = free_port()
    conf, replaced = re.subn(r"listen 8000;", f"listen 127.0.0.1:{port};", conf)
    assert replaced == 1, "the compose config no longer listens on 8000: update this test"
    (tmp_path / "logs").mkdir()
    (tmp_path / "nginx.conf").write_text(conf)
    assert NGINX is not None
    command = [NGINX, "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf"), "-e", "stderr"]
    errors = tmp_path / "logs" / "stderr.log"
    with errors.open("wb") as stderr:
        process = subprocess.Popen(
            [*command, "-g", f"daemon off; pid {tmp_path / 'nginx.pid'};"], stderr=stderr
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:

            async def up() -> bool:
                try:
                    await client.get(url + "/wss/client.js")
                    return True
                except httpx.TransportError:
                    return process.poll() is not None

            for _ in range(100):
                if await up():
                    break
                await asyncio.sleep(0.05)
        if process.poll() is not None:
            pytest.fail(f"nginx did not start: {errors.read_text()}")
        yield url
    finally:
        process.terminate()
        process.wait(10)


async def _poll_until(client: httpx.AsyncClient, url: str, wanted: str) -> str:
    """Poll (Engine.IO long-polling GETs) until a payload holds `wanted`; returns it all."""
    seen = ""
    for _ in range(20):
        response = await client.get(url, timeout=10)
        assert response.status_code == 200, (response.status_code, response.text)
        seen += response.text + "\x1e"
        if wanted in seen:
            return seen
    raise AssertionError(f"{wanted!r} never came: {seen[:300]!r}")


async def _polling_tab(base: str, session: str) -> str:
    """One Socket.IO tab on long-polling only, as a browser does it (a cookie jar), through
    the proxy: handshake, CONNECT, then its join-time cart. Returns the gateway it landed on."""
    async with httpx.AsyncClient(cookies={"bookingfrontendsession": session}) as client:
        query = "/wss/socket.io/?EIO=4&transport=polling"
        opened = await client.get(base + query)
        assert opened.status_code == 200, opened.text
        sid = json.loads(opened.text[1:])["sid"]
        gateway = client.cookies["portico_gateway"]
        url = f"{base}{query}&sid={sid}"
        for _ in range(3):  # several requests: each must reach the gateway holding the session
            posted = await client.post(url, content="40")
            assert posted.status_code == 200, (posted.status_code, posted.text)
            await _poll_until(client, url, "partial_applications_response")
            await client.post(url, content='42["message",{"type":"ping","id":"p1"}]')
            await _poll_until(client, url, '"pong"')
            await client.post(url, content="41")
        return gateway


async def test_polling_tabs_keep_to_their_gateway_through_compose_nginx(stack: Stack, db, nginx: str):
    for session in SESSIONS:
        await add_application(db, session)
    landed = await asyncio.gather(*(_polling_tab(nginx, session) for session in SESSIONS))
    # nginx spread the handshakes over both gateways; every later request followed its cookie
    assert set(landed) == {"gateway-1", "gateway-2"}


async def test_without_the_cookie_polling_breaks_so_the_affinity_is_what_holds_it(stack: Stack, nginx: str):
    """The control: the same requests from a client that drops cookies land on either gateway,
    and some get 400 "Session ID unknown". (If this ever passes every time, the test above
    proves nothing.)"""
    unknown = 0
    for _ in range(12):
        async with httpx.AsyncClient() as client:
            query = "/wss/socket.io/?EIO=4&transport=polling"
            sid = json.loads((await client.get(nginx + query)).text[1:])["sid"]
            client.cookies.clear()
            for _ in range(4):
                response = await client.post(f"{nginx}{query}&sid={sid}", content="6")
                unknown += response.status_code == 400
    assert unknown > 0


async def test_raw_websocket_tabs_need_no_affinity(stack: Stack, db, redis_url, nginx: str):
    """The raw path is spread over the gateways (no affinity), and that is fine: the tabs of one
    session, on different gateways, all get the session's pushes. (This test used to pass
    whatever the proxy did with the tabs: it now checks that they were spread.)"""
    await add_application(db, SESSIONS[0])
    tabs = [await Tab.open(nginx.replace("http", "ws") + "/wss", session=SESSIONS[0]) for _ in range(4)]
    try:
        for tab in tabs:
            await tab.wait_pushes(1)
        behind = {
            g.gateway.id: len(g.gateway.tabs) for g in stack.gateways if g.gateway.id.startswith("gateway-")
        }
        assert behind == {"gateway-1": 2, "gateway-2": 2}, "nginx spread the raw tabs (round robin)"
        await add_application(db, SESSIONS[0])
        await trigger(redis_url, SESSIONS[0])
        for tab in tabs:
            [*_, pushed] = await tab.wait_pushes(2)
            assert pushed["data"]["count"] == 2
    finally:
        for tab in tabs:
            await tab.close()


async def test_a_socketio_tab_whose_gateway_drains_reconnects_to_the_other_one(
    stack: Stack, db, gateways: dict[str, int], nginx: str
):
    """The affinity cookie outlives its gateway: a browser keeps sending `portico_gateway=
    gateway-1`, and nginx routed every reconnection to gateway-1, which refuses handshakes while
    it drains (503) and is gone after (502), so Socket.IO tabs could not reconnect until it was
    back. A refused or failed handshake now goes to the other gateway, whose cookie then holds."""
    await add_application(db, SESSIONS[0])
    async with httpx.AsyncClient(cookies={"bookingfrontendsession": SESSIONS[0]}) as client:
        query = "/wss/socket.io/?EIO=4&transport=polling"
        first = await client.get(nginx + query)
        landed = client.cookies["portico_gateway"]
        url = f"{nginx}{query}&sid={json.loads(first.text[1:])['sid']}"
        assert (await client.post(url, content="40")).status_code == 200
        await _poll_until(client, url, "partial_applications_response")
        draining = next(g for g in stack.gateways if g.gateway.id == landed)
        await draining.gateway.drain()  # the tab is closed; it connects again at once
        again = await client.get(nginx + query)
        assert again.status_code == 200, again.text
        other = client.cookies["portico_gateway"]
        assert other != landed
        url = f"{nginx}{query}&sid={json.loads(again.text[1:])['sid']}"
        assert (await client.post(url, content="40")).status_code == 200
        await _poll_until(client, url, "partial_applications_response")
        await draining.stop()
        stack.gateways.remove(draining)
    # A tab that still has the old cookie, its gateway gone (connections to it are refused).
    async with httpx.AsyncClient() as client:
        cookie = f"bookingfrontendsession={SESSIONS[0]}; portico_gateway={landed}"
        third = await client.get(nginx + query, headers={"cookie": cookie})
        assert third.status_code == 200, third.text
        assert f"portico_gateway={other}" in third.headers["set-cookie"]


@pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (Debian's nodejs and npm)")
async def test_the_official_client_follows_a_drain_to_the_other_gateway(
    stack: Stack, db, redis_url, nginx: str
):
    """Drain for Socket.IO tabs, end to end: the real socket.io-client behind compose's nginx.
    The draining gateway closes the Engine.IO session without a Socket.IO DISCONNECT, so the
    client reconnects by itself; nginx sends it to the other gateway; its next cart comes from there."""
    from tests.support.sio_tabs import SioTab

    await add_application(db, SESSIONS[1])
    tab = await SioTab.open(nginx, session=SESSIONS[1], transports="websocket")
    try:
        await tab.wait_for("partial_applications_response")
        held = [g for g in stack.gateways if g.gateway.hub.sessions]
        assert len(held) == 1
        await held[0].gateway.drain()
        await tab.wait_event("connect", 2)
        await eventually(lambda: [g for g in stack.gateways if g.gateway.hub.sessions] not in ([], held))
        now = [g for g in stack.gateways if g.gateway.hub.sessions]
        assert len(now) == 1 and now[0] is not held[0]
        # It comes back with the offset of the cart it shows (connection-state recovery), so
        # that cart is not sent again; the next change reaches it through the other gateway.
        await add_application(db, SESSIONS[1])
        await trigger(redis_url, SESSIONS[1])
        await eventually(
            lambda: tab.pushes()[-1]["data"]["count"] == 2, 10, what="the change, via the other gateway"
        )
    finally:
        await tab.close()
