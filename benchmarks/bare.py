"""The benchmark's baselines: a bare Starlette/uvicorn WebSocket app with none of the service.

* relay: a Redis subscriber that sends each message's text to the sockets of the session it
  names (`<session>\\n<text>`), one `send_text` after another: the least a Redis->WebSocket
  relay can do, with the same uvicorn, loop and WebSocket implementation as the gateway.
* send loop: the session `*` sends the text to every socket (the mass invalidation baseline).
* idle sockets: a socket that sends nothing costs what uvicorn and Starlette need for it.
* listener (`listen`): a subscriber that reads each message and parses its JSON, nothing more,
  over the same protocol reader as the services (`shared.resp`): the least a fetcher can pay
  for a trigger it only discards.

    python -m benchmarks.bare PORT REDIS_URL CHANNEL
    python -m benchmarks.bare listen REDIS_URL CHANNEL
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
import uvicorn
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from services.gateway.main import event_loop_and_parser

sessions: dict[str, set[WebSocket]] = {}


async def serve(ws: WebSocket) -> None:
    await ws.accept()
    session = ws.cookies.get("bookingfrontendsession", "")
    sessions.setdefault(session, set()).add(ws)
    try:
        while (await ws.receive())["type"] != "websocket.disconnect":
            pass
    except WebSocketDisconnect:
        pass
    finally:
        sessions[session].discard(ws)


async def relay(url: str, channel: str) -> None:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub()
    await pubsub.subscribe(channel)
    async for message in pubsub.listen():
        if message["type"] != "message":
            continue
        session, _, text = message["data"].decode().partition("\n")
        targets = (
            [ws for members in sessions.values() for ws in members]
            if session == "*"
            else sessions.get(session, ())
        )
        for ws in list(targets):
            try:
                await ws.send_text(text)
            except Exception:
                pass


async def listen(url: str, channel: str) -> None:
    from shared.redis_topology import RedisTopology
    from shared.resp import PubSubConnection
    from shared.settings import RedisSettings

    def on_message(channel: str, data: bytes) -> None:
        json.loads(data)  # what a listener must do at least: read the message

    address = await RedisTopology(RedisSettings(url=url, prefix="bare:")).subscriber_address(channel)
    connection = await PubSubConnection.open(address, on_message, sharded=False, timeout=5)
    await connection.subscribe([channel])
    await connection.closed


def main() -> None:
    if sys.argv[1] == "listen":
        if event_loop_and_parser()[0] != "asyncio":  # uvloop, as the services run
            import uvloop

            uvloop.install()
        asyncio.run(listen(sys.argv[2], sys.argv[3]))
        return
    port, url, channel = int(sys.argv[1]), sys.argv[2], sys.argv[3]

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        task = asyncio.create_task(relay(url, channel))
        yield
        task.cancel()

    app = Starlette(routes=[WebSocketRoute("/wss", serve)], lifespan=lifespan)
    loop, http = event_loop_and_parser()
    # As the gateway's defaults: no permessage-deflate (the tabs offer it; both decline).
    uvicorn.run(
        app,
        host="127.0.0.1",
        port=port,
        ws="websockets-sansio",
        ws_per_message_deflate=False,
        loop=loop,
        http=http,
        log_level="warning",
    )


if __name__ == "__main__":
    main()
