"""`portico-push stack` (what `make run` runs): a whole working stack on one machine.

Redis and PostgreSQL are the ones named by REDIS_URL / DATABASE_URL when set; otherwise
throwaway local servers (`services.localservers`) with the Portico schema and demo data.
Then two fetchers and two gateways as child processes.

Stopping: Ctrl-C (SIGINT), SIGTERM and SIGHUP (the terminal closed) all stop the stack the same
way, quietly: the services first (SIGTERM, each drains), then Redis and PostgreSQL, whose
temporary directories are removed. Every child runs in its own session, so a signal from the
terminal reaches only this process, which stops them in that order; before, Ctrl-C killed
redis-server first (six warnings from the services), and SIGHUP leaked both servers.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import asyncpg

from services.localservers import LocalPostgres, LocalRedis, PortTaken, ServerUnavailable, free_port
from services.stackstate import RUN_DIR, STATE_FILE, write_state
from shared.settings import server_problem

SQL_DIR = Path(__file__).resolve().parent.parent / "deploy" / "sql"
GATEWAY_PORTS = (8080, 8081)
DEMO_PORT = 8000
FETCHER_PORTS = (9101, 9102)


def _port_or_free(preferred: int) -> int:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


async def ensure_schema(database_url: str) -> bool:
    """Load the schema and demo data unless the Portico tables already exist."""
    conn = await asyncpg.connect(database_url)
    try:
        if await conn.fetchval("SELECT to_regclass('bb_application') IS NOT NULL"):
            return False
        await conn.execute((SQL_DIR / "schema.sql").read_text())
        await conn.execute((SQL_DIR / "demo.sql").read_text())
        return True
    finally:
        await conn.close()


def _wait_ready(
    url: str, timeout: float, stopping: Callable[[], bool], child: subprocess.Popen[bytes]
) -> str | None:
    """None once `url` answers 200; else why not: the child exited (a configuration error, its
    message printed above it), or the timeout passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not stopping():
        if child.poll() is not None:
            return f"exited with code {child.returncode} before it was ready (its message is above)"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return None
        except OSError:
            pass
        time.sleep(0.2)
    return None if stopping() else f"not ready after {timeout:.0f}s: {url}"


class StackError(Exception):
    """A server the stack needs cannot be used: printed as one line, exit 1."""


def _check_redis(url: str) -> None:
    import redis

    client = redis.Redis.from_url(url, socket_connect_timeout=3)
    try:
        client.ping()
    except (redis.RedisError, OSError) as exc:
        raise StackError(server_problem("Redis", url, exc)) from None
    finally:
        client.close()


async def _check_database(url: str) -> bool:
    try:
        return await ensure_schema(url)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StackError(server_problem("PostgreSQL", url, exc)) from None


def run_stack() -> int:
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    # From the start: a signal while servers are starting must still clean them up.
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        with stack_lock():
            return _run_stack(lambda: stop)
    except (StackError, ServerUnavailable) as exc:
        print(f"portico-push stack: {exc}", file=sys.stderr)
        return 1


@contextlib.contextmanager
def stack_lock() -> Iterator[None]:
    """One local stack per user at a time. Two `make run` started together raced for the same
    ports: the second printed pg_ctl's traceback, left a 39 MB /tmp/portico-pg-* behind, and
    reported "started Redis" on the first one's port. The second now says so in one line."""
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    lock = (RUN_DIR / "stack.lock").open("a+")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            other = lock.read().strip() or "?"
            raise StackError(
                f"another local stack is running (pid {other}); stop it first (Ctrl-C in its terminal), "
                "or point this one at servers of its own with REDIS_URL and DATABASE_URL"
            ) from None
        lock.seek(0)
        lock.truncate()
        lock.write(str(os.getpid()))
        lock.flush()
        try:
            yield
        finally:
            STATE_FILE.unlink(missing_ok=True)
    finally:
        lock.close()


def _start_server(
    make: Callable[[int], LocalRedis | LocalPostgres], preferred: int
) -> LocalRedis | LocalPostgres:
    """A server on `preferred` if free, else on a free port; once more elsewhere if the port was
    taken between the check and the bind."""
    try:
        return make(_port_or_free(preferred)).start()
    except PortTaken:
        return make(free_port()).start()


def _run_stack(stopping: Callable[[], bool]) -> int:
    with ExitStack() as cleanup:
        redis_url = os.environ.get("REDIS_URL")
        if not redis_url:
            redis = _start_server(LocalRedis, 6390)
            cleanup.callback(redis.cleanup)
            redis_url = redis.url
            print(f"started Redis at {redis_url}")
        database_url = os.environ.get("DATABASE_URL")
        if not database_url:
            postgres = _start_server(LocalPostgres, 5440)
            cleanup.callback(postgres.cleanup)
            database_url = postgres.url
            print(f"started PostgreSQL at {database_url}")
        if os.environ.get("REDIS_URL"):
            _check_redis(redis_url)
        if asyncio.run(_check_database(database_url)):
            print("loaded the Portico schema and demo data (sessions demo-session-1, demo-session-2)")

        base_env = {
            **os.environ,
            "REDIS_URL": redis_url,
            "DATABASE_URL": database_url,
            "GATEWAY_HOST": "127.0.0.1",
            "FETCHER_HOST": "127.0.0.1",
            "DRAIN_SECONDS": os.environ.get("DRAIN_SECONDS", "1"),  # nobody to hand tabs to locally
        }
        children: list[subprocess.Popen[bytes]] = []

        def stop_children() -> None:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(25)
                except subprocess.TimeoutExpired:
                    child.kill()

        cleanup.callback(stop_children)
        demo_port = _port_or_free(DEMO_PORT)
        # The demo page is another origin than the gateways (other port): allow it explicitly.
        base_env["ALLOWED_ORIGINS"] = os.environ.get(
            "ALLOWED_ORIGINS", f"http://127.0.0.1:{demo_port},http://localhost:{demo_port}"
        )
        health: list[tuple[str, str, subprocess.Popen[bytes]]] = []  # (name, ready URL, process)

        def spawn(name: str, module: str, env: dict[str, str], ready_url: str) -> None:
            child = subprocess.Popen(
                [sys.executable, "-m", module], env={**base_env, **env}, start_new_session=True
            )
            children.append(child)
            health.append((name, ready_url, child))

        fetchers = [_port_or_free(preferred) for preferred in FETCHER_PORTS]
        for n, port in enumerate(fetchers, 1):
            env = {"FETCHER_PORT": str(port), "FETCHER_ID": f"fetcher-{n}"}
            spawn(f"fetcher-{n}", "services.fetcher.main", env, f"http://127.0.0.1:{port}/readyz")
        gateways = [_port_or_free(preferred) for preferred in GATEWAY_PORTS]
        for n, port in enumerate(gateways, 1):
            env = {"GATEWAY_PORT": str(port), "GATEWAY_ID": f"gateway-{n}"}
            spawn(f"gateway-{n}", "services.gateway.main", env, f"http://127.0.0.1:{port}/readyz")
        env = {
            "DEMO_PORT": str(demo_port),
            "DEMO_GATEWAYS": ",".join(f":{p}" for p in gateways),
            "DEMO_SESSION": os.environ.get("DEMO_SESSION", "demo-session-1"),  # the README's visitor
        }
        spawn("the demo page", "services.demo.app", env, f"http://127.0.0.1:{demo_port}/api/config")
        for name, url, child in health:
            problem = _wait_ready(url, 30, stopping, child)
            if stopping():
                return 0
            if problem is not None:
                print(f"portico-push stack: {name} {problem}", file=sys.stderr)
                return 1
        write_state(
            {
                "redis_url": redis_url,
                "database_url": database_url,
                "gateways": [f"ws://127.0.0.1:{port}/wss" for port in gateways],
                "fetchers": [f"http://127.0.0.1:{port}" for port in fetchers],
                "demo": f"http://127.0.0.1:{demo_port}/",
            }
        )

        cli = f"{Path(sys.executable).parent}/portico-push"
        print(
            "\nPortico Push is running: 2 gateways, 2 fetchers.\n"
            + f"\n  Demo booking page: http://127.0.0.1:{demo_port}/?gateway=1  and  ?gateway=2 in a second tab\n\n"
            + "".join(
                f"  gateway   ws://127.0.0.1:{p}/wss   (health http://127.0.0.1:{p}/readyz)\n"
                for p in gateways
            )
            + "".join(
                f"  fetcher   http://127.0.0.1:{p}/readyz   (metrics http://127.0.0.1:{p}/metrics)\n"
                for p in fetchers
            )
            + "\nWatch a visitor's cart in two 'tabs', one per gateway (two terminals):\n"
            + f"  {cli} listen ws://127.0.0.1:{gateways[0]}/wss --session demo-session-1\n"
            + f"  {cli} listen ws://127.0.0.1:{gateways[1]}/wss --session demo-session-1\n"
            + "Change the cart and push it, as the PHP backend does:\n"
            + f"  DATABASE_URL={database_url} REDIS_URL={redis_url} {cli} add-application demo-session-1\n"
            + "or only publish the trigger:\n"
            + f"  REDIS_URL={redis_url} {cli} trigger demo-session-1\n"
            + "\nCtrl-C stops everything.\n",
            flush=True,
        )
        while not stopping():
            for child in children:
                if child.poll() is not None:
                    print(f"a service exited with code {child.returncode}; stopping", file=sys.stderr)
                    return 1
            time.sleep(0.2)
        print("stopping...", flush=True)
    return 0
