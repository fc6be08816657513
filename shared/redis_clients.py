"""Redis command clients: the pool every service's commands (publish, scripts) go through.

Long-lived pub/sub connections have settings of their own (`shared.subscription`).
"""

from __future__ import annotations

import os
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ReadOnlyError
from redis.exceptions import TimeoutError as RedisTimeoutError


def speedups_enabled() -> bool:
    """uvloop, httptools and hiredis are used when installed, unless PORTICO_SPEEDUPS=0 (the
    benchmark's comparison run)."""
    return os.environ.get("PORTICO_SPEEDUPS", "1") != "0"


def parser_options() -> dict[str, Any]:
    if speedups_enabled():
        return {}  # redis-py picks hiredis when it is installed
    from redis._parsers import _AsyncRESP2Parser

    return {"parser_class": _AsyncRESP2Parser}


def create_client(url: str, *, max_connections: int = 64, wait_seconds: float = 10.0) -> aioredis.Redis:
    """Command client (publish, scripts), on a pool that *waits* for a free connection.

    redis-py's default pool raises "Too many connections" the moment all are busy: a connect
    storm of 2000 tabs failed 1936 claims that way. A `BlockingConnectionPool` queues callers
    for up to `wait_seconds` instead, so bursts slow down rather than fail. A command that
    meets a connection the server closed (a Redis restart) is retried on a new connection, and
    so is one answered READONLY: a primary demoted behind one endpoint (a managed Redis's
    failover) keeps its connections, and only a new connection reaches the new primary.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=wait_seconds,
        socket_connect_timeout=5,
        socket_timeout=5,
        health_check_interval=10,
        retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ReadOnlyError],
        **parser_options(),
    )
    return aioredis.Redis(connection_pool=pool)
