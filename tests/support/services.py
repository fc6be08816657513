"""Where the tests' Redis and PostgreSQL come from, and which way each run took.

`REDIS_URL` / `DATABASE_URL` when set; else, with `PORTICO_TEST_SERVERS=containers`,
testcontainers (`tests/support/containers.py`: podman's Docker API where no Docker engine runs,
the project's own images where no registry is reachable); else (the default, and the fastest)
throwaway local servers from the machine's binaries (`services.localservers`). The run's header
and summary say which was used (`USED`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from services.localservers import LocalPostgres, LocalRedis

USED: dict[str, str] = {}  # "redis" / "postgres" -> how this run got it


def mode() -> str:
    chosen = os.environ.get("PORTICO_TEST_SERVERS", "local")
    if chosen not in ("local", "containers"):
        raise RuntimeError(f"PORTICO_TEST_SERVERS must be local or containers, got {chosen!r}")
    return chosen


@contextlib.contextmanager
def redis_service() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        USED["redis"] = "REDIS_URL"
        yield os.environ["REDIS_URL"]
    elif mode() == "containers":
        from tests.support import containers

        engine = containers.configure()
        from testcontainers.community.redis import RedisContainer

        with RedisContainer(containers.REDIS_IMAGE) as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            USED["redis"] = f"testcontainers: {containers.REDIS_IMAGE} via {engine}, at {host}:{port}"
            yield f"redis://{host}:{port}/0"
    else:
        server = LocalRedis().start()
        USED["redis"] = f"local binary: {server.binary}, at 127.0.0.1:{server.port}"
        try:
            yield server.url
        finally:
            server.cleanup()


@contextlib.contextmanager
def postgres_service() -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        USED["postgres"] = "DATABASE_URL"
        yield os.environ["DATABASE_URL"]
    elif mode() == "containers":
        from tests.support import containers

        engine = containers.configure()
        from testcontainers.community.postgres import PostgresContainer

        with PostgresContainer(containers.POSTGRES_IMAGE, driver=None) as container:
            url = container.get_connection_url()
            USED["postgres"] = (
                f"testcontainers: {containers.POSTGRES_IMAGE} via {engine}, at {url.rsplit('@', 1)[-1]}"
            )
            yield url
    else:
        server = LocalPostgres().start()
        USED["postgres"] = f"local binaries: {server.bin}, at 127.0.0.1:{server.port}"
        try:
            yield server.url
        finally:
            server.cleanup()
