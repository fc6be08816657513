"""The browser client's own unit tests (tests/js, node's built-in runner), run from pytest so
that `make test` covers them; and the gateway serving the module."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.support.stack import Stack

ROOT = Path(__file__).resolve().parent.parent


def test_client_unit_tests_pass_under_node():
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    result = subprocess.run(
        [node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "# fail 0" in result.stdout and "# pass 0" not in result.stdout


@pytest.mark.anyio
async def test_gateway_serves_the_client_module(small_stack: Stack):
    running = small_stack.gateways[0]
    async with httpx.AsyncClient() as http:
        for path in ("/wss/client.js", "/client.js"):
            response = await http.get(running.http + path)
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/javascript")
            assert response.headers["access-control-allow-origin"] == "*"
            assert "export function createWebSocketClient" in response.text
