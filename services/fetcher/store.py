"""The cart store: reads a session's cart from PostgreSQL (asyncpg), the fetcher's only DB I/O.

Contract (`CartStore.fetch_carts`): returns, for each session id asked, its partial
applications as JSON objects ordered by id, all sessions read from one snapshot in one
statement (`= $1` for one session, `= ANY($1)` for more); raises `CartStoreError` when the
database cannot answer, whatever asyncpg raises (never an empty list in place of an error).
A session whose rows cannot be shaped (`ValueError` for an `'infinity'` timestamp) gets that
exception in place of its list, and costs only itself; a batch that PostgreSQL rejects for its
data is read again one session at a time, so one bad row never fails the others. `check()` returns None when the cart query can run, else why
not (unreachable, or the database lacks the Portico tables).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

import asyncpg

from services.fetcher.carts import CART_BATCH_QUERY, CART_QUERY, shape_application

log = logging.getLogger(__name__)
T = TypeVar("T")


class CartStoreError(Exception):
    """The cart could not be read (database down, timeout, query failed)."""


Cart = list[dict[str, Any]]


class CartStore(Protocol):
    statements: int  # cart statements run so far (a batch rejected for its data runs 1 + n)

    async def fetch_carts(self, session_ids: Sequence[str]) -> dict[str, Cart | Exception]: ...
    async def check(self) -> str | None: ...


class _Connections:
    """The store's PostgreSQL connections: at most `size`, opened when needed, kept while they
    work, dropped at the first error (their state is then unknown).

    Not asyncpg's pool: per cart query it cost 70 µs of CPU where a kept connection costs 41
    (its acquire and release bookkeeping, and a timeout enforced with a task of its own per
    query; here one `asyncio.timeout` scope). A released connection needs no reset: the store
    never changes session state (no SET, LISTEN or advisory lock), so a cart is one round trip."""

    def __init__(self, dsn: str, *, size: int, timeout: float) -> None:
        self._dsn = dsn
        self._timeout = timeout
        self._slots = asyncio.Semaphore(size)
        self._free: list[asyncpg.Connection] = []
        self._closing = False

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        rows: list[asyncpg.Record] = await self._run(lambda connection: connection.fetch(query, *args))
        return rows

    async def prepare(self, query: str) -> None:
        """Prepare without running (proves the tables and columns exist)."""
        await self._run(lambda connection: connection.prepare(query))

    async def _run(self, call: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """`call` on a connection of its own, within the timeout; the connection is kept
        afterwards, or closed at once if the call failed."""
        async with self._slots:
            connection = await self._take()
            try:
                async with asyncio.timeout(self._timeout):
                    result = await call(connection)
            except BaseException:
                connection.terminate()
                raise
            self._give(connection)
            return result

    async def _take(self) -> asyncpg.Connection:
        while self._free:
            connection = self._free.pop()
            if not connection.is_closed():
                return connection
        async with asyncio.timeout(self._timeout):
            connection = await asyncpg.connect(
                self._dsn,
                timeout=self._timeout,
                server_settings={"application_name": "portico-fetcher", "DateStyle": "ISO, YMD"},
            )
        return connection

    def _give(self, connection: asyncpg.Connection) -> None:
        if self._closing:
            connection.terminate()
        else:
            self._free.append(connection)

    async def close(self) -> None:
        self._closing = True
        free, self._free = self._free, []
        for connection in free:
            try:
                await asyncio.wait_for(connection.close(), 5)
            except Exception:
                connection.terminate()


class PostgresCartStore:
    def __init__(self, dsn: str, *, pool_size: int, timeout: float) -> None:
        self.statements = 0  # cart statements run (a batch rejected for its data runs 1 + n)
        # Connections are opened when first needed, so that a fetcher started while PostgreSQL
        # is down still comes up (not ready) and serves once the database appears.
        self._connections = _Connections(dsn, size=pool_size, timeout=timeout)

    async def fetch_cart(self, session_id: str) -> Cart:
        """One session's cart (raises what shaping raised, for that session)."""
        result = (await self.fetch_carts([session_id]))[session_id]
        if isinstance(result, Exception):
            raise result
        return result

    async def fetch_carts(self, session_ids: Sequence[str]) -> dict[str, Cart | Exception]:
        unique = list(dict.fromkeys(session_ids))
        try:
            rows = await self._fetch_rows(unique)
        except CartStoreError as exc:
            if len(unique) > 1 and isinstance(exc.__cause__, asyncpg.DataError):
                log.warning(
                    "a batch of %d carts was rejected (%s); reading them one by one", len(unique), exc
                )
                return await self._fetch_one_by_one(unique)
            raise
        carts: dict[str, Cart | Exception] = {sid: [] for sid in unique}
        for row in rows:
            sid = row["cart_session_id"]
            cart = carts.get(sid)
            if not isinstance(cart, list):
                continue  # this session failed already
            try:
                cart.append(shape_application(row))
            except Exception as exc:  # this session's error cart; the others are unaffected
                carts[sid] = exc
        return carts

    async def _fetch_one_by_one(self, session_ids: list[str]) -> dict[str, Cart | Exception]:
        carts: dict[str, Cart | Exception] = {}
        for sid in session_ids:
            try:
                carts.update(await self.fetch_carts([sid]))
            except CartStoreError as exc:
                carts[sid] = exc
        return carts

    async def _fetch_rows(self, session_ids: list[str]) -> list[asyncpg.Record]:
        self.statements += 1
        try:
            if len(session_ids) == 1:
                return await self._connections.fetch(CART_QUERY, session_ids[0])
            return await self._connections.fetch(CART_BATCH_QUERY, session_ids)
        except Exception as exc:
            # Not only PostgresError/InterfaceError/OSError: a fast PostgreSQL shutdown makes
            # asyncpg raise InternalClientError, which escaped and dropped the work.
            raise CartStoreError(f"{exc.__class__.__name__}: {exc}") from exc

    async def check(self) -> str | None:
        try:
            # Prepared, not run: proves every table and column the cart query reads exists (a
            # database without the Portico schema answers SELECT 1 fine).
            await self._connections.prepare(CART_QUERY)
        except asyncpg.UndefinedTableError as exc:
            return f"the Portico tables are missing ({exc})"
        except asyncpg.PostgresError as exc:
            return f"{exc.__class__.__name__}: {exc}"
        except Exception as exc:
            return f"unreachable ({exc.__class__.__name__}: {exc})"
        return None

    async def close(self) -> None:
        await self._connections.close()
