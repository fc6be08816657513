"""The fetcher's ASGI app: health, readiness and metrics around a running `Fetcher`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette

from shared.health import health_routes
from shared.settings import FetcherSettings

from .service import Fetcher
from .store import PostgresCartStore


def create_app(settings: FetcherSettings) -> Starlette:
    store = PostgresCartStore(
        settings.database_url, pool_size=settings.db_pool_size, timeout=settings.db_timeout_seconds
    )
    fetcher = Fetcher(settings, store)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await fetcher.start()
        try:
            yield
        finally:
            await fetcher.stop()
            await store.close()

    def ready() -> dict[str, bool]:
        return {
            "redis_subscription": fetcher.subscription.healthy,
            "redis_commands": fetcher.topology.commands_healthy,
            "database": fetcher.db_ok,
            "shards_agree": fetcher.leases.mismatch is None,
            "not_stopping": not fetcher.stopping,
            "background_tasks": fetcher.failure is None,
        }

    routes = health_routes(ready, fetcher.metrics.registry, lambda: fetcher.failure)
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.fetcher = fetcher
    return app
