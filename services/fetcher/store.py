"""The cart store: reads a session's cart from PostgreSQL (asyncpg), the fetcher's only DB I/O.

Contract (`CartStore.fetch_cart`): returns the session's partial applications as JSON objects,
ordered by id, all read from one snapshot in one round trip; raises `CartStoreError` when the
database cannot answer, whatever asyncpg raises (never an empty list in place of an error).
Shaping a row may raise anything else (`ValueError` for an `'infinity'` timestamp): the caller
turns that into an error cart too. `check()` returns None when the cart query can run, else why
not (unreachable, or the database lacks the Portico tables).
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
    async def check(self) -> str | None: ...


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
        except Exception as exc:
            # Not only PostgresError/InterfaceError/OSError: a fast PostgreSQL shutdown makes
            # asyncpg raise InternalClientError, which escaped and dropped the work.
            raise CartStoreError(f"{exc.__class__.__name__}: {exc}") from exc
        return [shape_application(row) for row in rows]

    async def check(self) -> str | None:
        try:
            pool = await self._get_pool()
            async with asyncio.timeout(self._timeout):
                async with pool.acquire(timeout=self._timeout) as connection:
                    # Prepared, not run: proves every table and column the cart query reads
                    # exists (a database without the Portico schema answers SELECT 1 fine).
                    await connection.prepare(CART_QUERY, timeout=self._timeout)
        except asyncpg.UndefinedTableError as exc:
            return f"the Portico tables are missing ({exc})"
        except asyncpg.PostgresError as exc:
            return f"{exc.__class__.__name__}: {exc}"
        except Exception as exc:
            return f"unreachable ({exc.__class__.__name__}: {exc})"
        return None

    async def close(self) -> None:
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), 5)
            except TimeoutError:
                self._pool.terminate()
