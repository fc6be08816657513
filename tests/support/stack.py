"""Real gateways and fetchers in the test's event loop: uvicorn servers and `Fetcher`s."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from typing import Any

from services.cli import publish_trigger
from services.fetcher.service import Fetcher
from services.fetcher.store import PostgresCartStore
from services.gateway.gateway import Gateway
from services.gateway.main import GatewayServer, uvicorn_config
from services.gateway.socketio_transport import SocketIOTransport
from services.localservers import free_port
from shared.protocol import session_hash, shard_of
from shared.settings import FetcherSettings, GatewaySettings, RedisSettings

from .data import add_application
from .tabs import Tab
from .waiting import eventually


@dataclass
class RunningGateway:
    gateway: Gateway
    server: GatewayServer
    task: asyncio.Task[None]
    port: int

    @property
    def socketio(self) -> SocketIOTransport:
        return self.server.app.socketio

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/wss"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 30)


@dataclass
class Stack:
    redis_url: str
    database_url: str
    prefix: str
    gateway_env: dict[str, Any] = field(default_factory=dict)
    fetcher_env: dict[str, Any] = field(default_factory=dict)
    gateways: list[RunningGateway] = field(default_factory=list)
    fetchers: list[Fetcher] = field(default_factory=list)
    stores: list[PostgresCartStore] = field(default_factory=list)
    # Sentinel or Cluster (`tests/support/redis_topologies.py`); None: the node at `redis_url`
    topology: RedisSettings | None = None

    def redis_settings(self) -> RedisSettings:
        if self.topology is not None:
            return replace(self.topology, prefix=self.prefix)
        return RedisSettings(url=self.redis_url, prefix=self.prefix)

    async def add_gateway(self, **overrides: Any) -> RunningGateway:
        n = len(self.gateways) + 1
        options: dict[str, Any] = {
            "host": "127.0.0.1",
            "port": free_port(),
            "gateway_id": f"gw{n}",
            "ownership_ttl_seconds": 3.0,
            "request_timeout_seconds": 5.0,
            "drain_seconds": 0.5,
            **self.gateway_env,
            **overrides,
        }
        if any(g.gateway.id == options["gateway_id"] for g in self.gateways):
            options["gateway_id"] += f"-{n}"
        settings = GatewaySettings(redis=self.redis_settings(), **options)
        server = GatewayServer(uvicorn_config(settings, log_level="warning"))
        server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        task = asyncio.create_task(server.serve())
        await eventually(lambda: server.started or task.done(), 10, what="gateway start")
        if task.done():
            task.result()
        gateway = server.gateway
        running = RunningGateway(gateway, server, task, settings.port)
        await eventually(lambda: gateway.subscription.live, 10, what="gateway subscribed")
        self.gateways.append(running)
        return running

    async def add_fetcher(self, **overrides: Any) -> Fetcher:
        n = len(self.fetchers) + 1
        settings = FetcherSettings(
            redis=self.redis_settings(),
            database_url=overrides.pop("database_url", self.database_url),
            fetcher_id=f"fetcher{n}",
            lease_ttl_seconds=2.0,
            **{**self.fetcher_env, **overrides},
        )
        store = PostgresCartStore(
            settings.database_url, pool_size=settings.db_pool_size, timeout=settings.db_timeout_seconds
        )
        fetcher = Fetcher(settings, store)
        await fetcher.start()
        self.fetchers.append(fetcher)
        self.stores.append(store)
        await eventually(lambda: fetcher.subscription.live, 10, what="fetcher subscribed")
        return fetcher

    async def wait_shards_settled(self, timeout: float = 15.0) -> None:
        """Every shard served by exactly one running fetcher."""

        def settled() -> bool:
            held = [set(f.leases.held()) for f in self.fetchers]
            total = sum(len(h) for h in held)
            return (
                total == self.fetchers[0].settings.shards and len(set().union(*held)) == total and all(held)
            )

        await eventually(settled, timeout, what="shards split between fetchers")

    async def close(self) -> None:
        # Background loops that died are caught by the suite's `no_background_task_died`.
        for running in self.gateways:
            with contextlib.suppress(Exception):
                await running.stop()
        for fetcher in self.fetchers:
            with contextlib.suppress(Exception):
                await fetcher.stop()
        for store in self.stores:
            with contextlib.suppress(Exception):
                await store.close()


@contextlib.asynccontextmanager
async def running_stack(
    redis_url: str,
    database_url: str,
    prefix: str,
    *,
    gateways: int = 2,
    fetchers: int = 2,
    topology: RedisSettings | None = None,
) -> AsyncIterator[Stack]:
    stack = Stack(redis_url, database_url, prefix, topology=topology)
    try:
        for _ in range(fetchers):
            await stack.add_fetcher()
        for _ in range(gateways):
            await stack.add_gateway()
        if fetchers:
            await stack.wait_shards_settled()
        yield stack
    finally:
        await stack.close()


def session_served_by(fetcher: Fetcher, prefix: str) -> str:
    """A session id (`<prefix>-<n>`) whose shard `fetcher` holds now."""
    return next(
        f"{prefix}-{i}"
        for i in range(10_000)
        if fetcher.leases.owns(shard_of(session_hash(f"{prefix}-{i}"), fetcher.settings.shards))
    )


async def trigger(redis: str | RedisSettings, session_id: str) -> None:
    """Publish exactly what the PHP backend publishes after a cart change."""
    await publish_trigger(redis, session_id)


async def a_change_reaches_every_gateway(
    stack: Stack, db: Any, redis: str | RedisSettings, sid: str
) -> list[Tab]:
    """A tab of `sid` on every gateway gets its cart, then the next one after a change and its
    trigger (the whole push path, on whatever Redis `redis` names). Returns the tabs."""
    await add_application(db, sid)
    tabs = [await Tab.open(running.url, session=sid) for running in stack.gateways]
    for tab in tabs:
        await tab.wait_pushes(1)
    await add_application(db, sid)
    await trigger(redis, sid)
    for tab in tabs:
        assert (await tab.wait_pushes(2))[-1]["data"]["count"] == 2
    return tabs
