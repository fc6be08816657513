"""The official Engine.IO and Socket.IO protocol test suites (tests/conformance), run under
Node against `tests/support/conformance_server.py`, which is the gateway's own `engineio` and
`socketio` code with the echo behaviour the suites expect.

Needs node and npm (Debian's `nodejs` and `npm`; `.ci/run` installs them); the suites' npm
packages are installed once into `.venv/conformance/` from the npm registry, pinned by each
suite's package-lock.json. The suites need port 3000.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SUITES = ROOT / "tests" / "conformance"
WORK = ROOT / ".venv" / "conformance"

pytestmark = [
    pytest.mark.skipif(shutil.which("npm") is None, reason="npm is not installed (Debian's nodejs and npm)"),
]


def _install(suite: str) -> Path:
    target = WORK / suite
    if not (target / "node_modules").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(SUITES / suite, target)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=target, check=True, timeout=300
        )
    return target


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@pytest.fixture(scope="module")
def server():
    if not _port_free(3000):
        pytest.fail("port 3000 is taken: the suites need it for the server under test")
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.support.conformance_server", "3000"], cwd=ROOT, env={**os.environ}
    )
    deadline = time.monotonic() + 15
    while _port_free(3000):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail("the conformance server did not start")
        time.sleep(0.1)
    yield
    process.terminate()
    process.wait(10)


@pytest.mark.parametrize("suite", ["engine.io-protocol", "socket.io-protocol"])
def test_the_official_suite_passes_completely(server, suite):
    folder = _install(suite)
    result = subprocess.run(
        ["npx", "mocha", "--reporter", "dot", "test-suite.js"],
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    print(result.stdout[-2000:])
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert " failing" not in result.stdout and " passing" in result.stdout
