"""The container images, built and run as operators run them (`make images`, then a container).

Both images are built by `services/images.py` (on a local Debian base where python:3.11 cannot
be pulled), then run with a read-only root filesystem, as their non-root user, against the
test's real Redis and PostgreSQL: health, readiness, a push end to end, and a `stop` that drains
within the grace period the manifests give. Skipped, with the reason, where no container engine
works (`.ci/run` installs Debian's podman, buildah and runc).

Behind a TLS-inspecting proxy the builds need its CA: `CA_BUNDLE`, else the machine's own trust
store (what this machine's pip trusts) is handed to the build.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from services import images
from services.fetcher import shutdown as fetcher_shutdown
from services.gateway.shutdown import grace_period_seconds
from services.gateway.vendor import SOCKETIO_BUNDLE
from services.localservers import free_port
from tests.support.data import add_application, seed_reference
from tests.support.stack import trigger
from tests.support.tabs import Tab
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio

SID = "imageSession00001"
DRAIN = 2.0


@pytest.fixture(scope="module")
def engine() -> Iterator[str]:
    try:
        found = images.find_engine()
    except images.ImageError as exc:
        pytest.skip(str(exc))
    if not os.environ.get("CA_BUNDLE"):
        bundle = ssl.get_default_verify_paths().cafile
        if bundle and Path(bundle).is_file():
            os.environ["CA_BUNDLE"] = bundle
    try:
        built = images.build_all(found, "test")
    except images.ImageError as exc:
        pytest.fail(f"the images did not build: {exc}")
    print(f"\nimages: {', '.join(f'{name} {size:.0f} MB' for name, size in built.items())}")
    yield found


class Container:
    def __init__(self, engine: str, image: str, env: dict[str, str]) -> None:
        self.engine = engine
        self.name = f"portico-test-{uuid.uuid4().hex[:10]}"
        args = ["run", "-d", "--name", self.name, "--network", "host", "--read-only", "--tmpfs", "/tmp"]
        for key, value in env.items():
            args += ["-e", f"{key}={value}"]
        result = images.run(engine, *args, image, quiet=True)
        assert result.returncode == 0, result.stderr

    def exec(self, *command: str) -> str:
        return images.run(self.engine, "exec", self.name, *command, quiet=True).stdout.strip()

    def logs(self) -> str:
        result = images.run(self.engine, "logs", self.name, quiet=True)
        return result.stdout + result.stderr

    def stop(self, grace: float) -> tuple[float, int]:
        """`stop` as an orchestrator does (SIGTERM, SIGKILL after `grace`): seconds, exit code."""
        started = time.monotonic()
        images.run(self.engine, "stop", "-t", str(int(grace)), self.name, quiet=True, timeout=grace + 30)
        took = time.monotonic() - started
        code = images.run(self.engine, "inspect", "--format", "{{.State.ExitCode}}", self.name, quiet=True)
        return took, int(code.stdout.strip() or -1)

    def remove(self) -> None:
        images.run(self.engine, "rm", "-f", self.name, quiet=True)


@pytest.fixture
async def containers(engine: str, redis_url: str, database_url: str, prefix: str, db) -> AsyncIterator[dict]:
    await seed_reference(db)
    gateway_port, fetcher_port = free_port(), free_port()
    common = {"REDIS_URL": redis_url, "REDIS_PREFIX": prefix, "LOG_LEVEL": "INFO"}
    fetcher = Container(
        engine,
        "portico-push-fetcher:test",
        {**common, "DATABASE_URL": database_url, "FETCHER_PORT": str(fetcher_port), "LEASE_TTL_SECONDS": "2"},
    )
    gateway = Container(
        engine,
        "portico-push-gateway:test",
        {**common, "GATEWAY_PORT": str(gateway_port), "DRAIN_SECONDS": str(DRAIN)},
    )
    try:
        yield {
            "gateway": gateway,
            "fetcher": fetcher,
            "gateway_http": f"http://127.0.0.1:{gateway_port}",
            "fetcher_http": f"http://127.0.0.1:{fetcher_port}",
        }
    finally:
        for container in (gateway, fetcher):
            container.remove()


async def _ok(url: str) -> bool:
    try:
        async with httpx.AsyncClient() as client:
            return (await client.get(url, timeout=2)).status_code == 200
    except httpx.HTTPError:
        return False


async def test_both_images_run_non_root_read_only_healthy_and_ready(containers: dict, engine: str):
    for service in ("gateway", "fetcher"):
        http = containers[f"{service}_http"]
        await eventually(lambda http=http: _ok(http + "/readyz"), 60, what=f"{service} ready")
        assert await _ok(http + "/healthz")
        container: Container = containers[service]
        assert container.exec("id", "-u") == "10001", "runs as its non-root user"
        written = images.run(engine, "exec", container.name, "touch", "/opt/venv/x", quiet=True)
        assert written.returncode != 0, "the root filesystem is read-only"
        inspected = images.run(engine, "image", "inspect", f"portico-push-{service}:test", quiet=True)
        config = json.loads(inspected.stdout)[0]
        assert config["Config"]["User"] == "10001:10001"
        healthcheck = config["Config"].get("Healthcheck") or config.get("Healthcheck")  # docker / podman
        assert "/healthz" in " ".join(healthcheck["Test"]), "the HEALTHCHECK is kept"


async def test_the_gateway_image_serves_the_integrity_checked_bundle(containers: dict):
    http = containers["gateway_http"]
    await eventually(lambda: _ok(http + "/healthz"), 60, what="gateway up")
    async with httpx.AsyncClient() as client:
        response = await client.get(http + "/wss/socket.io/socket.io.js")
    assert response.status_code == 200, response.text[:200]
    if SOCKETIO_BUNDLE.is_file():  # the same bytes npm published (both were checked against its hash)
        assert response.content == SOCKETIO_BUNDLE.read_bytes()


async def test_a_push_end_to_end_then_a_stop_that_drains_inside_the_grace_period(
    containers: dict, db, redis_url: str
):
    for service in ("gateway", "fetcher"):
        http = containers[f"{service}_http"]
        await eventually(lambda http=http: _ok(http + "/readyz"), 60, what=f"{service} ready")
    url = containers["gateway_http"].replace("http", "ws") + "/wss"
    await add_application(db, SID)
    tab = await Tab.open(url, session=SID)
    try:
        [joined] = await tab.wait_pushes(1, 20)
        assert joined["data"]["count"] == 1
        await add_application(db, SID)
        await trigger(redis_url, SID)
        pushes = await tab.wait_pushes(2, 20)
        assert pushes[-1]["data"]["count"] == 2
        grace = grace_period_seconds(DRAIN)
        took, code = await asyncio.to_thread(containers["gateway"].stop, grace)
        assert await tab.wait_closed(5) == 1001
        assert tab.of_type("reconnect_required"), "told to reconnect before the close"
        assert code == 0 and took < grace, (took, code, containers["gateway"].logs()[-2000:])
        took, code = await asyncio.to_thread(
            containers["fetcher"].stop, fetcher_shutdown.grace_period_seconds()
        )
        assert code == 0 and took < fetcher_shutdown.grace_period_seconds(), (took, code)
        assert "shard leases: released" in containers["fetcher"].logs(), "its shards handed over on SIGTERM"
    finally:
        if tab.closed_code is None:
            await tab.close()


def test_a_missing_ca_bundle_is_named_not_a_pip_traceback(engine: str, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("CA_BUNDLE", str(tmp_path / "nowhere.pem"))
    with pytest.raises(images.ImageError, match=r"CA_BUNDLE=.*nowhere\.pem is not a file"):
        images.build(engine, "portico-push-never:test", Path("services/fetcher/Dockerfile"), Path("."), "x")


def test_podman_runs_with_the_repositorys_settings_never_etc():
    conf = Path(images.containers_conf())
    assert conf == Path(__file__).resolve().parent.parent / "deploy" / "containers" / "containers.conf"
    text = conf.read_text()
    assert 'runtime = "runc"' in text and "nofile=10000:10000" in text
    assert images.engine_env()["CONTAINERS_CONF"] == str(conf)
