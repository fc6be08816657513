"""The cart store: reads a session's cart from PostgreSQL (asyncpg), the fetcher's only DB I/O.

Contract (`CartStore.fetch_cart`): returns the session's partial applications as JSON objects,
ordered by id, all read from one snapshot in one round trip; raises `CartStoreError` when the
database cannot answer (never an empty list in place of an error).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Protocol

import asyncpg

from services.fetcher.carts import CART_QUERY, shape_application

log = logging.getLogger(__name__)


async def _keep_session(connection: asyncpg.Connection) -> None:
    """Pool release without asyncpg's default `RESET ALL; UNLISTEN *; ...` round trip: the
    store never changes session state (no SET, LISTEN or advisory locks), so there is nothing
    to reset, and a cart costs one round trip instead of two."""


class CartStoreError(Exception):
    """The cart could not be read (database down, timeout, query failed)."""


class CartStore(Protocol):
    async def fetch_cart(self, session_id: str) -> list[dict[str, Any]]: ...
    async def check(self) -> bool: ...


class PostgresCartStore:
    def __init__(self, dsn: str, *, pool_size: int, timeout: float) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._timeout = timeout
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def _get_pool(self) -> asyncpg.Pool:
        # Created lazily, so that a fetcher started while PostgreSQL is down still comes up
        # (not ready) and starts serving when the database appears.
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self._dsn,
                        min_size=0,
                        max_size=self._pool_size,
                        timeout=self._timeout,
                        command_timeout=self._timeout,
                        server_settings={"application_name": "portico-fetcher", "DateStyle": "ISO, YMD"},
                        reset=_keep_session,
                    )
        return self._pool

    async def fetch_cart(self, session_id: str) -> list[dict[str, Any]]:
        try:
            pool = await self._get_pool()
            async with asyncio.timeout(self._timeout * 2):
                rows = await pool.fetch(CART_QUERY, session_id, timeout=self._timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise CartStoreError(f"{exc.__class__.__name__}: {exc}") from exc
        return [shape_application(row) for row in rows]

    async def check(self) -> bool:
        try:
            pool = await self._get_pool()
            async with asyncio.timeout(self._timeout):
                await pool.fetchval("SELECT 1", timeout=self._timeout)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return False
        return True

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except TimeoutError:
                self._pool.terminate()
