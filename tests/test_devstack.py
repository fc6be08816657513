"""The local stack (`make run`) and the CLI, run as a user runs them: real processes, real
signals, and the one line a mistake deserves."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
ENV = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "DATABASE_URL")}


def _closed(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_the_local_stack_stops_cleanly_on_every_signal(signum: signal.Signals):
    """Bug: closing the terminal of `make run` (SIGHUP) leaked redis-server and PostgreSQL with
    their temp directories (the next run silently moved to other ports, so the README's
    commands talked to the orphans); Ctrl-C printed six warnings because redis-server, in the
    same process group, died first. Now every signal stops services first, servers last,
    quietly. The signal goes to the whole process group, as a terminal sends it."""
    before = _server_dirs()
    stack = subprocess.Popen(
        [str(BIN / "portico-push"), "stack"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ENV, "LOG_LEVEL": "INFO"},
        start_new_session=True,
    )
    assert stack.stdout is not None
    started: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = stack.stdout.readline()
        started.append(line)
        if not line or "Ctrl-C stops everything" in line:
            break
    head = "".join(started)
    assert "Portico Push is running" in head, head
    ports = [int(p) for p in re.findall(r"started \w+ at \S+?127\.0\.0\.1:(\d+)/", head)]
    assert len(_server_dirs() - before) == 2, "the stack's two servers keep their data in temp dirs"
    os.killpg(stack.pid, signum)
    rest, _ = stack.communicate(timeout=60)
    assert stack.returncode == 0, rest
    assert len(ports) == 2 and all(_closed(port) for port in ports), (ports, head)
    noisy = [line for line in rest.splitlines() if re.search(r"WARNING|ERROR|Traceback", line)]
    assert noisy == [], "\n".join(noisy)
    assert _server_dirs() - before == set(), "temp directories left behind"


def _server_dirs() -> set[str]:
    import tempfile

    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith(("portico-redis-", "portico-pg-"))}


def _cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "portico-push"), *args], capture_output=True, text=True, env={**ENV, **env}, timeout=30
    )


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("trigger", "someSession1"), {"REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis"),
        (
            ("add-application", "someSession1"),
            {"DATABASE_URL": "postgresql://u:secret@127.0.0.1:1/x"},
            "cannot reach PostgreSQL",
        ),
        (("listen", "ws://127.0.0.1:1/wss"), {}, "cannot reach the gateway"),
        (("stack",), {"REDIS_URL": "redis://127.0.0.1:1/0"}, "cannot reach Redis"),
        (
            ("stack",),
            {"REDIS_URL": "redis://127.0.0.1:1/0", "DATABASE_URL": "postgresql://127.0.0.1:1/x"},
            "cannot",
        ),
    ],
)
def test_cli_mistakes_are_one_clear_line_and_a_failure(args, env, says):
    """Bug: CLI and `make run` mistakes (no stack running, a wrong DATABASE_URL, Redis down)
    printed 40-60-line tracebacks."""
    result = _cli(*args, **env)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in result.stderr, result.stderr
    assert "secret" not in result.stderr


def test_a_trigger_nobody_hears_is_a_failure(redis_url, prefix):
    """Bug: `portico-push trigger <id>` with no fetcher listening printed "0 fetcher(s)
    listening" and exited 0, so a script could not tell its push went nowhere."""
    result = _cli("trigger", "nobodyListens1", REDIS_URL=redis_url)
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert "no fetcher is listening" in line


def _stack(run_dir: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "portico-push"), "stack"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**ENV, "LOG_LEVEL": "WARNING", "PORTICO_RUN_DIR": str(run_dir), **env},
        start_new_session=True,
    )


@pytest.mark.slow
def test_a_bad_setting_stops_the_local_stack_at_once_with_the_reason(tmp_path: Path):
    """Bug: `make run` with a bad setting printed the configuration error at once, then waited
    30 s and ended with a misleading "not ready after 30s", although every child had already
    exited with 2. It now stops as soon as a child exits, naming it, and leaves nothing behind."""
    before = _server_dirs()
    started = time.monotonic()
    stack = _stack(tmp_path, OUTBOX_FRAMES="1")
    out, _ = stack.communicate(timeout=60)
    assert stack.returncode == 1, out
    assert time.monotonic() - started < 20, "not after a 30 s wait"
    assert "OUTBOX_FRAMES must be between 2 and 10000" in out
    assert re.search(r"portico-push stack: (gateway|fetcher)-\d exited with code 2", out), out
    assert "not ready after" not in out and "Traceback" not in out
    assert _server_dirs() - before == set()


@pytest.mark.slow
def test_a_second_local_stack_says_so_in_one_line_and_leaves_nothing(tmp_path: Path):
    """Bug: two `make run` started together: the second printed a 20-line pg_ctl traceback,
    left a 39 MB /tmp/portico-pg-* behind and reported "started Redis" on the first one's port
    (it checked the port, then bound it). Now one stack runs per user: the second says so in
    one line, exits 1, starts nothing and leaves nothing; the first runs on."""
    first = _stack(tmp_path)
    try:
        assert first.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = first.stdout.readline()
            if not line or "Ctrl-C stops everything" in line:
                break
        before = _server_dirs()
        second = _stack(tmp_path)
        out, _ = second.communicate(timeout=30)
        assert second.returncode == 1
        [line] = out.strip().splitlines()
        assert line.startswith("portico-push stack: another local stack is running (pid ")
        assert _server_dirs() == before
        state = json.loads((tmp_path / "stack.json").read_text())
        assert first.poll() is None and state["gateways"] and state["fetchers"]
        # The demo page's new visitor is the README's `demo-session-1` (it was a random id, so
        # the README's terminal commands never changed the page it showed).
        import urllib.request

        with urllib.request.urlopen(state["demo"], timeout=10) as page:
            assert "bookingfrontendsession=demo-session-1" in page.headers["set-cookie"]
        # The CLI finds the running stack from its state file, whatever ports it took.
        result = _cli("trigger", "demo-session-1", PORTICO_RUN_DIR=str(tmp_path))
        assert result.returncode == 0, result.stderr
    finally:
        os.killpg(first.pid, signal.SIGINT)
        first.communicate(timeout=60)
    assert not (tmp_path / "stack.json").exists(), "the state file goes with the stack"


def test_a_server_whose_port_was_taken_meanwhile_says_so_and_leaves_nothing():
    """The race behind the second stack: a server started on a port another one took between
    the check and the bind. Redis answered "started" on the other's port; PostgreSQL raised
    pg_ctl's traceback and left its directory. Both now raise PortTaken, cleaned up."""
    from services.localservers import LocalPostgres, LocalRedis, PortTaken

    redis = LocalRedis().start()
    postgres = LocalPostgres().start()
    try:
        before = _server_dirs()
        with pytest.raises(PortTaken, match=f"port {redis.port} is taken"):
            LocalRedis(redis.port).start()
        with pytest.raises(PortTaken, match=f"PostgreSQL did not start on port {postgres.port}"):
            LocalPostgres(postgres.port).start()
        assert _server_dirs() - before == set()
    finally:
        redis.cleanup()
        postgres.cleanup()


async def _acli(*args: str, **env: str) -> tuple[int, str]:
    """The CLI run beside the test's own event loop (the gateways under test live in it)."""
    import asyncio

    process = await asyncio.create_subprocess_exec(
        str(BIN / "portico-push"), *args, stderr=asyncio.subprocess.PIPE, env={**ENV, **env}
    )
    _, stderr = await asyncio.wait_for(process.communicate(), 30)
    assert process.returncode is not None
    return process.returncode, stderr.decode()


@pytest.mark.anyio
async def test_cli_urls_and_refusals_are_one_line_with_the_right_hint(small_stack):
    """Bug: `REDIS_URL=foo portico-push trigger` printed a traceback, and the hint "is the stack
    running (make run)?" was added to a 403 and to a wrong URL scheme, where it misled."""
    code, err = await _acli("trigger", "someSession1", REDIS_URL="foo")
    assert code == 1 and err.strip() == "portico-push: REDIS_URL must be a redis/rediss/unix URL, got 'foo'"
    code, err = await _acli("listen", "http://127.0.0.1:1/wss")
    assert code == 1 and "ws/wss URL" in err and "make run" not in err
    code, err = await _acli("listen", small_stack.gateways[0].url, "--origin", "https://evil.example")
    assert code == 1
    [line] = err.strip().splitlines()
    assert "HTTP 403" in line and "make run" not in line
    code, err = await _acli("listen", "ws://127.0.0.1:1/wss")
    assert code == 1 and "is the stack running (make run)?" in err


@pytest.mark.anyio
async def test_listen_says_why_when_the_gateway_goes_away(small_stack):
    """Bug: `portico-push listen` exited silently (status 0) when the stack stopped."""
    import asyncio

    gateway = small_stack.gateways[0]
    listener = await asyncio.create_subprocess_exec(
        str(BIN / "portico-push"),
        "listen",
        gateway.url,
        "--session",
        "someSession1",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    assert listener.stderr is not None
    assert b"connected to" in await asyncio.wait_for(listener.stderr.readline(), 10)
    await gateway.stop()
    small_stack.gateways.remove(gateway)
    await asyncio.wait_for(listener.wait(), 15)
    rest = (await listener.stderr.read()).decode()
    assert listener.returncode == 1
    assert "the gateway closed the connection (code 1001" in rest, rest
