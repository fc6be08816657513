"""The Redis and PostgreSQL a benchmark runs against: REDIS_URL / DATABASE_URL when set, else
throwaway local servers, stopped when the given ExitStack closes."""

from __future__ import annotations

import asyncio
import os
from contextlib import ExitStack

from services.devstack import ensure_schema
from services.localservers import LocalPostgres, LocalRedis


def redis_url(cleanup: ExitStack) -> str:
    url = os.environ.get("REDIS_URL")
    if url:
        return url
    server = LocalRedis().start()
    cleanup.callback(server.cleanup)
    return server.url


def database_url(cleanup: ExitStack) -> str:
    """DATABASE_URL or a local PostgreSQL, with the Portico tables in place."""
    url = os.environ.get("DATABASE_URL")
    if not url:
        postgres = LocalPostgres().start()
        cleanup.callback(postgres.cleanup)
        url = postgres.url
    asyncio.run(ensure_schema(url))
    return url
