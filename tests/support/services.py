"""Where the tests' Redis and PostgreSQL come from.

`REDIS_URL` / `DATABASE_URL` when set; else testcontainers when a Docker engine answers; else
throwaway local servers (`services.localservers`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

from services.localservers import LocalPostgres, LocalRedis


def docker_available() -> bool:
    if os.environ.get("PORTICO_TESTS_NO_DOCKER") or not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@contextlib.contextmanager
def redis_service() -> Iterator[str]:
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
    elif docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7-alpine") as container:
            host, port = container.get_container_host_ip(), container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
    else:
        server = LocalRedis().start()
        try:
            yield server.url
        finally:
            server.cleanup()


@contextlib.contextmanager
def postgres_service() -> Iterator[str]:
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
    elif docker_available():
        from testcontainers.postgres import PostgresContainer

        with PostgresContainer("postgres:15-alpine", driver=None) as container:
            yield container.get_connection_url()
    else:
        server = LocalPostgres().start()
        try:
            yield server.url
        finally:
            server.cleanup()
