"""The server the official Engine.IO and Socket.IO test suites run against (tests/conformance).

Built on the gateway's own `engineio` and `socketio` modules with the behaviour the suites'
READMEs ask for: `pingInterval` 300 ms, `pingTimeout` 200 ms, `maxPayload` 1000000, CORS `*`,
`connectTimeout` 1000 ms; on `/engine.io/` every message is echoed; on `/socket.io/` the
namespaces `/` and `/custom` emit `"auth"` on connection, answer `"message"` with
`"message-back"` and acknowledge `"message-with-ack"`, and any other namespace is refused.

    python -m tests.support.conformance_server [port]
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn

from services.gateway.engineio import EngineConfig, EngineServer, EngineSession, Message
from services.gateway.socketio import Socket, SocketIOServer

CONFIG = EngineConfig(ping_interval=0.3, ping_timeout=0.2, max_payload=1_000_000, cors_any_origin=True)


class Echo:
    def on_open(self, session: EngineSession) -> None:
        pass

    def on_message(self, session: EngineSession, message: Message) -> None:
        session.send(message)

    def on_close(self, session: EngineSession, reason: str) -> None:
        pass


class EchoNamespace:
    def on_connect(self, socket: Socket, auth: dict[str, Any]) -> None:
        socket.emit("auth", auth)

    def on_event(self, socket: Socket, name: str, args: list[Any], ack_id: int | None, binary: bool) -> None:
        if name == "message":
            socket.emit("message-back", *args)
        elif name == "message-with-ack" and ack_id is not None:
            socket.ack(ack_id, *args)

    def on_disconnect(self, socket: Socket, reason: str) -> None:
        pass


def create_app() -> Any:
    engine = EngineServer(Echo(), CONFIG)
    namespaces: dict[str, Any] = {"/": EchoNamespace(), "/custom": EchoNamespace()}
    socketio = EngineServer(SocketIOServer(namespaces, connect_timeout=1.0), CONFIG)

    @asynccontextmanager
    async def lifespan() -> AsyncIterator[None]:
        tasks = [asyncio.create_task(engine.run_heartbeat()), asyncio.create_task(socketio.run_heartbeat())]
        yield
        for task in tasks:
            task.cancel()

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            async with lifespan():
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            assert message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete"})
            return
        path = scope["path"]
        if path.startswith("/engine.io"):
            await engine(scope, receive, send)
        elif path.startswith("/socket.io"):
            await socketio(scope, receive, send)
        elif scope["type"] == "http":
            await send({"type": "http.response.start", "status": 404, "headers": []})
            await send({"type": "http.response.body", "body": b""})

    return app


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    uvicorn.run(create_app(), host="127.0.0.1", port=port, log_level="warning", ws="websockets-sansio")
