"""The tests' testcontainers path: Redis and PostgreSQL in containers, on our machines too.

`PORTICO_TEST_SERVERS=containers` selects it (CI runs it beside the default local-binary path,
which is faster). Where no Docker engine answers, podman's Docker-compatible API is started for
the run (`podman system service`, with this repository's containers.conf), and testcontainers is
pointed at it (`TESTCONTAINERS_RYUK_DISABLED`, `TESTCONTAINERS_CONNECTION_MODE=docker_host`: the
machine looks like a container to it). No registry is reachable here, so the images are the
project's own (`tests/images/`, built by `python -m services.images --only-test-servers` when
missing); `PORTICO_TEST_REDIS_IMAGE` / `PORTICO_TEST_POSTGRES_IMAGE` name others (`redis:7-alpine`,
`postgres:15-alpine` where a registry is there).
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from services import images

REDIS_IMAGE = os.environ.get("PORTICO_TEST_REDIS_IMAGE", "localhost/portico-push-redis:local")
POSTGRES_IMAGE = os.environ.get("PORTICO_TEST_POSTGRES_IMAGE", "localhost/portico-push-postgres:local")


class ContainersUnavailable(RuntimeError):
    pass


def _docker_answers() -> bool:
    import docker

    try:
        client = docker.from_env(timeout=10)
        client.ping()
        client.close()
        return True
    except Exception:
        return False


def ensure_engine() -> str:
    """A Docker API for testcontainers: DOCKER_HOST or the default socket when one answers, else
    podman's, started here for the rest of the run. Returns a description for the report."""
    if _docker_answers():
        return os.environ.get("DOCKER_HOST", "the Docker engine")
    podman = shutil.which("podman")
    if podman is None:
        raise ContainersUnavailable(
            "no Docker engine answers and podman is not installed (Debian's podman, runc)"
        )
    socket_path = Path(tempfile.mkdtemp(prefix="portico-podman-")) / "podman.sock"
    service = subprocess.Popen(
        [podman, "system", "service", "--time=0", f"unix://{socket_path}"],
        env=images.engine_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    atexit.register(service.terminate)
    os.environ["DOCKER_HOST"] = f"unix://{socket_path}"
    deadline = time.monotonic() + 30
    while not _docker_answers():
        if service.poll() is not None or time.monotonic() > deadline:
            raise ContainersUnavailable("podman system service did not answer")
        time.sleep(0.2)
    return f"podman's Docker API at {socket_path}"


def ensure_images() -> None:
    missing = [
        image for image in (REDIS_IMAGE, POSTGRES_IMAGE) if image.startswith("localhost/portico-push-")
    ]
    engine = images.find_engine()
    if any(not images.image_exists(engine, image) for image in missing):
        print(f"\nbuilding the test servers' images with {engine} (services/images.py)", flush=True)
        images.build_all(engine, "local", services=False, test_servers=True)


def configure() -> str:
    os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    os.environ.setdefault("TESTCONTAINERS_CONNECTION_MODE", "docker_host")
    engine = ensure_engine()
    ensure_images()
    return engine
