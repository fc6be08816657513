"""The demo in a real browser (headless Chromium): the main job, visible.

Two tabs of one visitor on two gateways; a backend change; a tab cut off during a change; a
server message through session_targeted; an entity-room message; a foreign page trying to
read the cart with the visitor's cookie. Screenshots go to test-output/.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import HTMLResponse
from starlette.routing import Route

from services.demo.app import create_app as create_demo
from services.localservers import free_port
from tests.support.browser import Browser, Tab, find_chromium
from tests.support.stack import running_stack
from tests.support.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "test-output"


async def serve(app, port: int) -> tuple[uvicorn.Server, asyncio.Task]:
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    server.install_signal_handlers = lambda: None
    task = asyncio.create_task(server.serve())
    await eventually(lambda: server.started, 10, what="server start")
    return server, task


@pytest.fixture
async def browser():
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    browser = await Browser(binary).start()
    try:
        yield browser
    finally:
        await browser.close()


@pytest.fixture
async def demo(redis_url, database_url, prefix, db):
    """Two fetchers, two gateways allowing the demo's origin, and the demo site."""
    await db.execute((ROOT / "deploy" / "sql" / "demo.sql").read_text())
    demo_port = free_port()
    origin = f"http://127.0.0.1:{demo_port}"
    async with running_stack(redis_url, database_url, prefix, gateways=0) as stack:
        for _ in range(2):
            await stack.add_gateway(allowed_origins=(origin,))
        gateways = [f":{g.port}" for g in stack.gateways]
        server, task = await serve(create_demo(database_url, redis_url, gateways), demo_port)
        try:
            yield stack, origin
        finally:
            server.should_exit = True
            await task


async def open_demo(browser: Browser, origin: str, gateway: int, transport: str = "websocket") -> Tab:
    query = f"?gateway={gateway}" + ("&transport=socketio" if transport == "socketio" else "")
    tab = await browser.new_tab(f"{origin}/{query}")
    await tab.wait_for("document.querySelector('#status').dataset.state === 'open'")
    await tab.wait_for("document.querySelector('#count').textContent !== '–'")
    return tab


async def count(tab: Tab) -> str | None:
    return await tab.text("#count")


async def test_two_tabs_on_two_gateways_update_together(browser: Browser, demo):
    stack, origin = demo
    first = await open_demo(browser, origin, 1)
    second = await open_demo(browser, origin, 2)
    assert await count(first) == await count(second) == "0"
    await first.click("#add")
    await first.wait_for("document.querySelector('#count').textContent === '1'")
    await second.wait_for("document.querySelector('#count').textContent === '1'")
    await second.click("#add")
    for tab in (first, second):
        await tab.wait_for("document.querySelectorAll('#items li').length === 2")
    assert await first.text("#total") == await second.text("#total")
    assert "kr" in (await first.text("#total") or "")
    # The two tabs really are on two different gateways.
    assert [len(g.gateway.tabs) for g in stack.gateways] == [1, 1]
    await first.screenshot(OUTPUT / "demo-tab-gateway-1.png")
    await second.screenshot(OUTPUT / "demo-tab-gateway-2.png")
    # Remove from the second tab; the first follows.
    await second.click("#items li .remove")
    await first.wait_for("document.querySelector('#count').textContent === '1'")


async def test_a_socketio_tab_and_a_raw_tab_update_together(browser: Browser, demo):
    """Today's frontend transport: the page on socket.io-client (the bundle the gateway serves,
    polling then WebSocket, cookies with withCredentials from another origin) beside a raw tab."""
    from services.gateway.vendor import SOCKETIO_BUNDLE

    if not SOCKETIO_BUNDLE.is_file():
        pytest.skip("no socket.io-client bundle installed (make install fetches it from npm)")
    stack, origin = demo
    sio = await open_demo(browser, origin, 1, "socketio")
    raw = await open_demo(browser, origin, 2)
    assert await sio.text("#status-text") == "Live · gateway 1 · Socket.IO"
    await raw.click("#add")
    for tab in (sio, raw):
        await tab.wait_for("document.querySelector('#count').textContent === '1'")
    await sio.click("#add")
    for tab in (sio, raw):
        await tab.wait_for("document.querySelectorAll('#items li').length === 2")
    assert [t.link.transport for t in stack.gateways[0].gateway.tabs.values()] == ["socketio"]
    assert [t.link.transport for t in stack.gateways[1].gateway.tabs.values()] == ["websocket"]
    await sio.screenshot(OUTPUT / "demo-tab-socketio.png")


async def test_a_tab_cut_off_during_a_change_shows_it_after_reconnecting(browser: Browser, demo):
    stack, origin = demo
    first = await open_demo(browser, origin, 1)
    second = await open_demo(browser, origin, 2)
    gateway_one = stack.gateways[0]
    await gateway_one.stop()  # the first tab loses its socket and keeps retrying
    stack.gateways.remove(gateway_one)
    await first.wait_for("document.querySelector('#status').dataset.state !== 'open'")
    await second.click("#add")
    await second.wait_for("document.querySelector('#count').textContent === '1'")
    assert await count(first) == "0", "cut off: it cannot know yet"
    await stack.add_gateway(port=gateway_one.port, allowed_origins=(origin,))  # back on the same address
    await first.wait_for("document.querySelector('#status').dataset.state === 'open'", 30)
    await first.wait_for("document.querySelector('#count').textContent === '1'")


async def test_server_message_toast_through_session_targeted(browser: Browser, demo):
    _stack, origin = demo
    first = await open_demo(browser, origin, 1)
    second = await open_demo(browser, origin, 2)
    await first.click("#toast-me")
    for tab in (first, second):
        await tab.wait_for("document.querySelector('.toast')?.textContent.includes('Hei fra saksbehandler')")


async def test_entity_room_message_reaches_only_subscribed_tabs(browser: Browser, demo):
    _stack, origin = demo
    watcher = await open_demo(browser, origin, 1)
    other = await open_demo(browser, origin, 2)
    await watcher.click("#watch")
    await watcher.wait_for("document.body.dataset.watching === 'subscribed'")
    await other.click("#post-room")
    await watcher.wait_for("document.querySelectorAll('#room-log li').length === 1")
    await asyncio.sleep(1)
    assert await other.evaluate("document.querySelectorAll('#room-log li').length") == 0


async def test_a_foreign_page_cannot_read_the_cart_with_the_visitors_cookie(browser: Browser, demo):
    stack, origin = demo
    visitor = await open_demo(browser, origin, 1)  # the visitor has a session cookie for 127.0.0.1
    await visitor.click("#add")
    await visitor.wait_for("document.querySelector('#count').textContent === '1'")
    target = stack.gateways[0].url
    evil = f"""<!doctype html><script>
      window.result = {{messages: [], closed: null, error: false}};
      const ws = new WebSocket({json.dumps(target)});
      ws.onmessage = (e) => window.result.messages.push(e.data);
      ws.onerror = () => {{ window.result.error = true; }};
      ws.onclose = (e) => {{ window.result.closed = e.code; }};
    </script>"""
    evil_port = free_port()

    async def page(request):
        return HTMLResponse(evil)

    server, task = await serve(Starlette(routes=[Route("/", page)]), evil_port)
    try:
        tab = await browser.new_tab(f"http://127.0.0.1:{evil_port}/")
        await tab.wait_for("window.result && window.result.closed !== null")
        result = await tab.evaluate("window.result")
        assert result["messages"] == [] and result["error"] is True, result
        rejected = stack.gateways[0].gateway.metrics.handshakes_rejected.labels("origin")._value.get()
        assert rejected >= 1
    finally:
        server.should_exit = True
        await task


async def test_a_closed_browser_leaves_no_profile_behind():
    """Bug: each browser test run left two /tmp/portico-chromium-* profiles: Chromium's helper
    processes outlived the browser and wrote the profile again after it was removed."""
    binary = find_chromium()
    if binary is None:
        pytest.skip("Chromium is not installed (.ci/run installs Debian's chromium)")
    browser = await Browser(binary).start()
    profile = Path(browser.profile)
    tab = await browser.new_tab("about:blank")
    assert tab is not None and profile.is_dir()
    assert processes_using(profile), "Chromium and its helpers name the profile"
    await browser.close()
    assert processes_using(profile) == [], "no helper is left to write the profile again"
    await asyncio.sleep(1)
    assert not profile.exists()


def processes_using(profile: Path) -> list[int]:
    """Pids of the processes started with `--user-data-dir=<profile>` (Chromium's helpers too)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if f"--user-data-dir={profile}".encode() in cmdline.read_bytes():
                found.append(int(cmdline.parent.name))
        except OSError:
            pass  # gone meanwhile
    return found
