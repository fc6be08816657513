"""A browser tab on the official socket.io-client (version of today's Portico frontend),
driven under Node by `tests/js/socketio-client/tab.mjs`.

The npm package is installed once into `.venv/socketio-client/` (pinned by the lock file).
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from .waiting import eventually

ROOT = Path(__file__).resolve().parent.parent.parent
SOURCE = ROOT / "tests" / "js" / "socketio-client"
WORK = ROOT / ".venv" / "socketio-client"


def install_client() -> Path:
    if not (WORK / "node_modules" / "socket.io-client").is_dir():
        shutil.rmtree(WORK, ignore_errors=True)
        shutil.copytree(SOURCE, WORK)
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=WORK, check=True, timeout=300
        )
    shutil.copy(SOURCE / "tab.mjs", WORK / "tab.mjs")  # the driver may be newer than the install
    return WORK


class SioTab:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.events: list[tuple[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls,
        base_url: str,
        *,
        session: str | None = None,
        path: str = "/wss/socket.io",
        transports: str = "polling,websocket",
        origin: str | None = None,
    ) -> SioTab:
        folder = install_client()
        cookie = f"bookingfrontendsession={session}" if session else ""
        process = await asyncio.create_subprocess_exec(
            "node",
            str(folder / "tab.mjs"),
            base_url,
            path,
            transports,
            cookie,
            origin or "",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def _read(self) -> None:
        assert self.process.stdout is not None
        while line := await self.process.stdout.readline():
            event = json.loads(line)
            self.events.append((event["event"], event["data"]))

    def of(self, event: str) -> list[Any]:
        return [data for name, data in self.events if name == event]

    def messages(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [m for m in self.of("message") if kind is None or m.get("type") == kind]

    def pushes(self) -> list[dict[str, Any]]:
        return [
            m
            for m in self.messages("partial_applications_response")
            if m["data"].get("source") == "server_push"
        ]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.messages(kind)) >= count, timeout, what=f"{count} x {kind}")
        return self.messages(kind)

    async def wait_event(self, event: str, count: int = 1, timeout: float = 10.0) -> list[Any]:
        await eventually(lambda: len(self.of(event)) >= count, timeout, what=f"{count} x {event}")
        return self.of(event)

    async def _command(self, command: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write((json.dumps(command) + "\n").encode())
        await self.process.stdin.drain()

    async def send(self, message: dict[str, Any]) -> None:
        await self._command({"send": message})

    async def drop_transport(self) -> None:
        await self._command({"drop": True})

    async def close(self) -> None:
        if self.process.returncode is None:
            try:
                await self._command({"close": True})
                await asyncio.wait_for(self.process.wait(), 5)
            except (TimeoutError, ConnectionError):
                self.process.kill()
                await self.process.wait()
        await self._reader
