"""The chaos suites' fleet: real gateway and fetcher processes, reconnecting tabs, and a loader of
versioned cart changes (`tests/test_chaos.py`, `tests/test_chaos_redis.py`).

3 gateways and 2 fetchers run as separate processes (so they can be SIGKILLed). 40 sessions have
3 tabs each that reconnect like the browser client (`ReconnectingTab`). The loader changes a
random session's cart (its application is renamed `v<N>`) and publishes the trigger, as PHP does,
40 times a second. `converge` measures how long until every tab shows its session's final
version.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import httpx

from services.cli import publish_trigger
from services.localservers import free_port
from shared.keys import SESSION_MESSAGES_CHANNEL
from shared.protocol import now_iso
from shared.redis_topology import RedisTopology
from shared.settings import RedisSettings
from tests.conftest import SCHEMA_SQL
from tests.support.data import add_application, seed_reference
from tests.support.tabs import ReconnectingTab
from tests.support.waiting import eventually

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
        # CHAOS_LOG_DIR=/some/dir keeps each process's log there (for a failure's story).
        log_dir = os.environ.get("CHAOS_LOG_DIR")
        name = self.env.get("GATEWAY_ID") or self.env.get("FETCHER_ID") or self.module
        output = open(os.path.join(log_dir, f"{name}.log"), "ab") if log_dir else subprocess.DEVNULL
        self.process = subprocess.Popen(
            [sys.executable, "-m", self.module],
            env={**os.environ, **self.env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
        if log_dir:
            output.close()  # type: ignore[union-attr]

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

    async def is_ready(self, http: httpx.AsyncClient) -> bool:
        try:
            return (await http.get(self.health, timeout=1)).status_code == 200
        except httpx.HTTPError:
            return False

    async def wait_ready(self, timeout: float = 30) -> None:
        async with httpx.AsyncClient() as http:
            await eventually(lambda: self.is_ready(http), timeout, 0.1, what=f"{self.module} ready")


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
    """Versioned cart changes: the database first, then the trigger, as PHP does: to a Redis URL
    on a new connection each time, or through Sentinel or a Cluster on a client kept between
    triggers (as phpredis keeps its slot map) and made again after an error."""

    def __init__(
        self, db: asyncpg.Connection, redis: str | RedisSettings, sessions: list[str], database_url: str
    ) -> None:
        self.db = db
        self.redis = redis
        self.database_url = database_url
        self.sessions = sessions
        self.final: dict[str, int] = dict.fromkeys(sessions, 0)
        self.version = 0
        self.failed_writes = 0
        self.failed_publishes = 0
        self._publisher: tuple[RedisTopology, Any] | None = None

    async def run_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            await self.change(random.choice(self.sessions))
            await asyncio.sleep(1 / CHANGES_PER_SECOND)

    async def run_until(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
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
            await self._publish(sid)
        except Exception:  # Redis down: the change is in the database; the services must still converge
            self.failed_publishes += 1

    async def _publish(self, sid: str) -> None:
        if isinstance(self.redis, str):
            await publish_trigger(self.redis, sid)
            return
        if self._publisher is None:
            topology = RedisTopology(self.redis)
            self._publisher = (topology, topology.command_client(max_connections=4))
        payload = {"type": "update_partial_applications", "sessionId": sid, "timestamp": now_iso()}
        try:
            await self._publisher[1].publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))
        except Exception:
            await self.close()
            raise

    async def close(self) -> None:
        if self._publisher is not None:
            topology, client = self._publisher
            self._publisher = None
            with contextlib.suppress(Exception):
                await client.aclose()
                await topology.aclose()


@dataclass
class Fleet:
    services: list[Service]
    tabs: list[ReconnectingTab]
    loader: Loader
    figures: list[str] = field(default_factory=list)

    @property
    def gateways(self) -> list[Service]:
        return [s for s in self.services if s.module == "services.gateway.main"]

    @property
    def fetchers(self) -> list[Service]:
        return [s for s in self.services if s.module == "services.fetcher.main"]

    async def converge(self, fault: str = "") -> float:
        """Seconds until every tab shows its session's final version (AssertionError past the bound)."""
        started = time.monotonic()

        def converged() -> bool:
            return all(version(tab) == self.loader.final[tab.session] for tab in self.tabs)

        try:
            await eventually(converged, CONVERGENCE_BOUND, 0.05, what="every tab on its final cart")
        except AssertionError:
            behind = [
                (t.session, version(t), self.loader.final[t.session])
                for t in self.tabs
                if version(t) != self.loader.final[t.session]
            ]
            raise AssertionError(
                f"{fault}: {len(behind)} tab(s) not on their final cart after {CONVERGENCE_BOUND}s: {behind[:5]}"
            ) from None
        return time.monotonic() - started

    async def all_ready(self, timeout: float) -> float:
        """Seconds until every service answers /readyz with 200."""
        started = time.monotonic()
        async with httpx.AsyncClient() as http:

            async def ready() -> bool:
                return all(await asyncio.gather(*(s.is_ready(http) for s in self.services)))

            try:
                await eventually(ready, timeout, 0.1, what="every service ready")
            except AssertionError:
                bodies = []
                for service in self.services:
                    try:
                        response = await http.get(service.health, timeout=1)
                        if response.status_code != 200:
                            bodies.append(
                                f"{service.env.get('GATEWAY_ID') or service.env.get('FETCHER_ID')}: {response.text}"
                            )
                    except httpx.HTTPError as exc:
                        bodies.append(f"{service.health}: {exc}")
                raise AssertionError(f"not ready after {timeout}s: {bodies}") from None
        return time.monotonic() - started

    async def push_reaches_all(self, timeout: float = 10.0) -> float:
        """Change every session's cart once and publish its trigger; seconds until every tab shows
        the change (a deaf subscriber anywhere shows here)."""
        started = time.monotonic()
        for sid in self.loader.sessions:
            await self.loader.change(sid)
        await eventually(
            lambda: all(version(tab) == self.loader.final[tab.session] for tab in self.tabs),
            timeout,
            0.02,
            what="the trigger after the fault on every tab",
        )
        return time.monotonic() - started


@contextlib.asynccontextmanager
async def running_fleet(
    redis_env: dict[str, str], publish_to: str | RedisSettings, database_url: str
) -> AsyncIterator[Fleet]:
    """3 gateways, 2 fetchers, 40 sessions of 3 tabs each, all on their first cart (`v0`).
    `redis_env` says where Redis is (`REDIS_URL`, or Sentinel's or a Cluster's variables)."""
    services: list[Service] = []
    tabs: list[ReconnectingTab] = []
    loader: Loader | None = None
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(SCHEMA_SQL)
        await seed_reference(conn)
        sessions = [f"chaosSession{n:04d}" for n in range(SESSIONS)]
        for sid in sessions:
            await add_application(conn, sid, name="v0")
        common = {**redis_env, "REDIS_PREFIX": "chaos:", "LOG_LEVEL": "WARNING"}
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
                "DATABASE_URL": database_url,
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
        loader = Loader(conn, publish_to, sessions, database_url)
        yield Fleet(services, tabs, loader)
    finally:
        if loader is not None:
            await loader.close()
        for tab in tabs:
            await tab.stop()
        for service in services:
            if service.process is not None and service.process.poll() is None:
                service.process.kill()
                service.process.wait()
        for db in {conn, loader.db if loader is not None else conn}:  # the loader reconnects after a fault
            with contextlib.suppress(Exception):
                await db.close()


async def restart(service: Service, signum: int) -> None:
    service.signal(signum)
    await service.wait_exit()
    service.start()
    await service.wait_ready()
