"""Raw WebSocket tabs: text frames in and out, open and close reported to the gateway core.

The transport the contract was written for (`docs/PROTOCOL.md` §1): one JSON object per text
frame on `/wss`. Everything a tab does goes through the core (`app.Gateway`: `refusal`,
`open_client`, `apply`, `close_client`), as Socket.IO tabs do (`socketio_transport.py`).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from shared.protocol import CloseCode

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger(__name__)


async def serve(gateway: Gateway, ws: WebSocket) -> None:
    """A raw WebSocket tab, from handshake to close."""
    refused = gateway.refusal(ws.headers, ws.url.scheme)
    if refused is not None:
        status, text = refused
        if status == 403:
            await ws.close(code=CloseCode.POLICY_VIOLATION)  # before accept: HTTP 403
        elif gateway.draining:
            await ws.close(code=CloseCode.TRY_AGAIN_LATER)
        else:
            await ws.send_denial_response(Response(text + "\n", status, headers={"Retry-After": "5"}))
        return
    await ws.accept()
    client = gateway.open_client(ws, "websocket")
    try:
        await gateway.apply(client, gateway.open_actions(client, ws.headers.get("cookie")))
        while not client.protocol.closed:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw_text = message.get("text")
            if raw_text is not None:
                gateway.metrics.messages_received.labels("text").inc()
                actions = client.protocol.on_text(raw_text)
            else:
                gateway.metrics.messages_received.labels("binary").inc()
                actions = client.protocol.on_binary()
            await gateway.apply(client, actions)
        if client.writer is not None and client.protocol.closed:
            await asyncio.wait([client.writer], timeout=2)  # flush the last error, close
    except (WebSocketDisconnect, OSError):  # OSError: uvicorn's ClientDisconnected
        pass
    except Exception:
        log.exception("socket %d: unexpected error; closing it", client.id)
        gateway.close_after_flush(client, CloseCode.INTERNAL_ERROR, "internal error")
        if client.writer is not None:
            await asyncio.wait([client.writer], timeout=2)
    finally:
        gateway.close_client(client)
