"""Chaos: faults under a steady load of versioned cart changes, on real processes.

3 gateways and 2 fetchers run as separate processes (so they can be SIGKILLed) against a Redis
and a PostgreSQL this test starts itself (so they can be restarted). 40 sessions have 3 tabs
each that reconnect like the browser client (`ReconnectingTab`). A loader changes a random
session's cart (its application is renamed `v<N>`) and publishes the trigger, 40 times a second. For each fault:
load, fault, heal, load, stop the load, then measure how long until every tab shows its
session's final version. Asserted for every fault: every tab converges within
`CONVERGENCE_BOUND` seconds, no tab ever sees `seq` go back, and no final state is lost. The
figures are printed (`make chaos` shows them) and quoted in the README.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest

from services.cli import publish_trigger
from services.localservers import LocalPostgres, LocalRedis, free_port
from tests.conftest import SCHEMA_SQL
from tests.support.data import add_application, seed_reference
from tests.support.tabs import ReconnectingTab
from tests.support.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.slow]

CONVERGENCE_BOUND = 15.0  # seconds from the end of the load to every tab on its final cart
SESSIONS = 40
TABS_PER_SESSION = 3
CHANGES_PER_SECOND = 40


@dataclass
class Service:
    module: str
    env: dict[str, str]
    health: str
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    async def wait_exit(self, timeout: float = 30) -> int:
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if time.monotonic() > deadline:
                self.process.kill()
            await asyncio.sleep(0.05)
        return self.process.returncode

    async def wait_ready(self) -> None:
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                try:
                    return (await http.get(self.health, timeout=1)).status_code == 200
                except httpx.HTTPError:
                    return False

            await eventually(ready, 30, 0.1, what=f"{self.module} ready")


def version(tab: ReconnectingTab) -> int | None:
    """The `v<N>` of the newest cart the tab shows (None: no cart yet, or an error cart)."""
    carts = [f["data"] for f in tab.frames if f.get("type") == "partial_applications_response"]
    if not carts or carts[-1].get("error"):
        return None
    applications = carts[-1].get("applications") or []
    return int(applications[0]["name"][1:]) if applications else None


def seq_went_back(tab: ReconnectingTab) -> int:
    """How often the tab was sent a cart older than one it had (across its reconnects)."""
    newest, back = 0, 0
    for frame in tab.frames:
        if frame.get("type") == "partial_applications_response":
            seq = frame["data"]["seq"]
            back += seq < newest
            newest = max(newest, seq)
    return back


class Loader:
    """Versioned cart changes: the database first, then the trigger, as PHP does."""

    def __init__(
        self, db: asyncpg.Connection, redis_url: str, sessions: list[str], database_url: str
    ) -> None:
        self.db = db
        self.redis_url = redis_url
        self.database_url = database_url
        self.sessions = sessions
        self.final: dict[str, int] = dict.fromkeys(sessions, 0)
        self.version = 0
        self.failed_writes = 0

    async def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.change(random.choice(self.sessions))
            await asyncio.sleep(1 / CHANGES_PER_SECOND)

    async def change(self, sid: str) -> None:
        self.version += 1
        version = self.version
        try:
            if self.db.is_closed():
                self.db = await asyncpg.connect(self.database_url)
            await self.db.execute(
                "UPDATE bb_application SET name = $1 WHERE session_id = $2", f"v{version}", sid
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            self.failed_writes += 1  # the database is down: this change did not happen
            return
        self.final[sid] = version
        try:
            await publish_trigger(self.redis_url, sid)
        except Exception:
            pass  # Redis down: the change is in the database; the services must still converge


@pytest.fixture
async def chaos(tmp_path) -> AsyncIterator[dict[str, Any]]:
    redis = LocalRedis().start()
    postgres = LocalPostgres().start()
    services: list[Service] = []
    tabs: list[ReconnectingTab] = []
    try:
        conn = await asyncpg.connect(postgres.url)
        await conn.execute(SCHEMA_SQL)
        await seed_reference(conn)
        sessions = [f"chaosSession{n:04d}" for n in range(SESSIONS)]
        for sid in sessions:
            await add_application(conn, sid, name="v0")
        common = {"REDIS_URL": redis.url, "REDIS_PREFIX": "chaos:", "LOG_LEVEL": "WARNING"}
        gateway_ports = [free_port() for _ in range(3)]
        for n, port in enumerate(gateway_ports, 1):
            env = {
                **common,
                "GATEWAY_HOST": "127.0.0.1",
                "GATEWAY_PORT": str(port),
                "GATEWAY_ID": f"chaos-gw{n}",
                "OWNERSHIP_TTL_SECONDS": "3",
                "REQUEST_TIMEOUT_SECONDS": "3",
                "DRAIN_SECONDS": "1",
            }
            services.append(Service("services.gateway.main", env, f"http://127.0.0.1:{port}/readyz"))
        for n in range(1, 3):
            port = free_port()
            env = {
                **common,
                "DATABASE_URL": postgres.url,
                "FETCHER_HOST": "127.0.0.1",
                "FETCHER_PORT": str(port),
                "FETCHER_ID": f"chaos-f{n}",
                "LEASE_TTL_SECONDS": "2",
                "DB_TIMEOUT_SECONDS": "1",
            }
            services.append(Service("services.fetcher.main", env, f"http://127.0.0.1:{port}/readyz"))
        for service in services:
            service.start()
        for service in services:
            await service.wait_ready()
        urls = [f"ws://127.0.0.1:{port}/wss" for port in gateway_ports]
        for i, sid in enumerate(sessions):
            for t in range(TABS_PER_SESSION):
                k = (i + t) % len(urls)
                tabs.append(
                    await ReconnectingTab(urls[k:] + urls[:k], sid).start()
                )  # preferred gateway first
        await eventually(lambda: all(version(tab) == 0 for tab in tabs), 30, what="every tab has its cart")
        yield {
            "redis": redis,
            "postgres": postgres,
            "services": services,
            "gateways": services[:3],
            "fetchers": services[3:],
            "tabs": tabs,
            "loader": Loader(conn, redis.url, sessions, postgres.url),
        }
    finally:
        for tab in tabs:
            await tab.stop()
        for service in services:
            if service.process is not None and service.process.poll() is None:
                service.process.kill()
                service.process.wait()
        postgres.cleanup()
        redis.cleanup()


async def converge(env: dict[str, Any], fault: str = "") -> float:
    """Seconds until every tab shows its session's final version (AssertionError past the bound)."""
    loader: Loader = env["loader"]
    started = time.monotonic()

    def converged() -> bool:
        return all(version(tab) == loader.final[tab.session] for tab in env["tabs"])

    try:
        await eventually(converged, CONVERGENCE_BOUND, 0.05, what="every tab on its final cart")
    except AssertionError:
        behind = [
            (t.session, version(t), loader.final[t.session])
            for t in env["tabs"]
            if version(t) != loader.final[t.session]
        ]
        raise AssertionError(
            f"{fault}: {len(behind)} tab(s) not on their final cart after {CONVERGENCE_BOUND}s: {behind[:5]}"
        ) from None
    return time.monotonic() - started


async def restart(service: Service, signum: int) -> None:
    service.signal(signum)
    await service.wait_exit()
    service.start()
    await service.wait_ready()


async def test_every_tab_converges_after_every_fault(chaos):
    env = chaos
    loader: Loader = env["loader"]
    figures: list[tuple[str, float, int]] = []

    async def fault(name: str, inject, heal) -> None:
        await loader.run_for(1.0)
        await inject()
        await loader.run_for(2.0)
        await heal()
        await loader.run_for(1.0)
        before = loader.version
        seconds = await converge(env, name)
        figures.append((name, seconds, before))

    redis: LocalRedis = env["redis"]
    postgres: LocalPostgres = env["postgres"]
    gateway, fetcher = env["gateways"][0], env["fetchers"][0]

    async def nothing() -> None:
        pass

    async def kill_gateway() -> None:
        gateway.signal(signal.SIGKILL)
        await gateway.wait_exit()

    async def restart_gateway() -> None:
        gateway.start()
        await gateway.wait_ready()

    async def kill_fetcher() -> None:
        fetcher.signal(signal.SIGKILL)
        await fetcher.wait_exit()

    async def restart_fetcher() -> None:
        fetcher.start()
        await fetcher.wait_ready()

    async def stop_redis() -> None:
        redis.stop()
        await asyncio.sleep(3)

    async def start_redis() -> None:
        redis.start()

    async def stop_postgres() -> None:
        postgres.stop("fast")  # asyncpg raised InternalClientError on this one
        await asyncio.sleep(5)

    async def start_postgres() -> None:
        postgres.start()

    async def rolling_restart() -> None:
        for service in env["gateways"]:
            await restart(service, signal.SIGTERM)

    await fault("SIGKILL a gateway (restarted)", kill_gateway, restart_gateway)
    await fault("SIGKILL a fetcher (restarted)", kill_fetcher, restart_fetcher)
    await fault("Redis stopped 3 s and restarted empty", stop_redis, start_redis)
    await fault("PostgreSQL fast shutdown for 5 s", stop_postgres, start_postgres)
    await fault("SIGTERM each gateway in turn", rolling_restart, nothing)

    tabs: list[ReconnectingTab] = env["tabs"]
    print(
        f"\nchaos: {len(tabs)} tabs over {SESSIONS} sessions, 3 gateways, 2 fetchers, {CHANGES_PER_SECOND} changes/s"
    )
    for name, seconds, _ in figures:
        print(f"  {name:<42} every tab on its final cart {seconds:5.2f} s after the load stopped")
    print(
        f"  {loader.version} changes ({loader.failed_writes} refused by the stopped database), "
        f"{sum(len(t.connects) - 1 for t in tabs)} reconnects, seq went back {sum(map(seq_went_back, tabs))} times, "
        f"lost final states 0"
    )
    assert sum(map(seq_went_back, tabs)) == 0
    for service in env["services"]:
        assert service.process is not None and service.process.poll() is None, f"{service.module} died"
