"""The local stack (`make run`) and the CLI, run as a user runs them: real processes, real
signals, and the one line a mistake deserves."""

from __future__ import annotations

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
