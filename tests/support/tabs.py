"""A browser tab stand-in: a WebSocket client that records every JSON frame it receives."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from shared.codec import loads_strict

from .waiting import eventually


class Tab:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.frames: list[dict[str, Any]] = []
        self.not_json: list[str] = []  # frames a browser's JSON.parse would reject: always a bug
        self.closed_code: int | None = None
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def open(
        cls, url: str, *, session: str | None = None, cookie: str | None = None, origin: str | None = None
    ) -> Tab:
        headers = {}
        if session is not None:
            headers["Cookie"] = f"bookingfrontendsession={session}"
        if cookie is not None:
            headers["Cookie"] = cookie
        ws = await connect(url, additional_headers=headers, origin=origin, proxy=None, open_timeout=5)  # type: ignore[arg-type]
        return cls(ws)

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                try:
                    self.frames.append(loads_strict(raw))
                except ValueError:
                    self.not_json.append(str(raw)[:200])
        except Exception:
            pass
        finally:
            self.closed_code = self.ws.close_code

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send(message if isinstance(message, str) else json.dumps(message))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f.get("type") == kind]

    def pushes(self) -> list[dict[str, Any]]:
        return [
            f
            for f in self.of_type("partial_applications_response")
            if f["data"].get("source") == "server_push"
        ]

    async def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.of_type(kind)) >= count, timeout, what=f"{count} x {kind}")
        return self.of_type(kind)

    async def wait_pushes(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        await eventually(lambda: len(self.pushes()) >= count, timeout, what=f"{count} cart pushes")
        return self.pushes()

    async def wait_closed(self, timeout: float = 10.0) -> int | None:
        await asyncio.wait_for(self._reader, timeout)
        return self.closed_code

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait_for(self._reader, 5)


class ReconnectingTab:
    """A tab that behaves like the browser client: on a close it waits (the `retryAfterMs` of a
    `reconnect_required`, else a short back-off) and reconnects to the first gateway that
    accepts, keeping one record of everything received across connections."""

    def __init__(self, urls: list[str], session: str) -> None:
        self.urls = urls
        self.session = session
        self.frames: list[dict[str, Any]] = []
        self.connected_to: str | None = None
        self.closes: list[tuple[float, int | None]] = []  # (loop time, close code)
        self.connects: list[tuple[float, str]] = []  # (loop time, url)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> ReconnectingTab:
        self._task = asyncio.create_task(self._run())
        await eventually(lambda: self.connected_to is not None, what="first connection")
        return self

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            for url in self.urls:
                try:
                    ws = await connect(
                        url,
                        additional_headers={"Cookie": f"bookingfrontendsession={self.session}"},
                        proxy=None,
                        open_timeout=2,
                    )
                except Exception:
                    continue
                self.connected_to = url
                self.connects.append((loop.time(), url))
                retry_after = 0.1
                try:
                    async for raw in ws:
                        message = json.loads(raw)
                        self.frames.append(message)
                        if message.get("type") == "reconnect_required":
                            retry_after = message.get("retryAfterMs", 100) / 1000
                            await ws.close()
                except Exception:
                    pass
                self.connected_to = None
                self.closes.append((loop.time(), ws.close_code))
                await asyncio.sleep(retry_after)
                break
            else:
                await asyncio.sleep(0.1)

    def last_cart_count(self) -> int | None:
        carts = [f for f in self.frames if f.get("type") == "partial_applications_response"]
        return carts[-1]["data"].get("count") if carts else None

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
