"""Raw WebSocket tabs: text frames in and out, on the gateway core.

The transport the contract was written for (`docs/PROTOCOL.md` §1): one JSON object per text
frame on `/wss`. A raw tab's link is its Starlette WebSocket itself (`WebSocketLink`, no
object of its own: most tabs are idle, and each one's memory counts); the core does the rest.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect

from shared.protocol import CloseCode

from .gateway import Gateway
from .uvicorn_protocols import PROTOCOL_EXTENSION, abort_of

log = logging.getLogger(__name__)


class WebSocketLink(WebSocket):
    """A Starlette WebSocket that is also the core's `Link` for its tab."""

    transport = "websocket"

    async def write(self, text: str, seq: int) -> None:
        await self.send({"type": "websocket.send", "text": text})

    def try_write(self, text: str, seq: int) -> bool:
        protocol = self.scope.get("extensions", {}).get(PROTOCOL_EXTENSION)
        return protocol is not None and bool(protocol.write_now(text))

    def abort(self) -> None:
        """Drop the TCP connection now (`uvicorn_protocols.AbortableWebSocketProtocol`): a peer
        that does not read never takes a close frame."""
        abort = abort_of(self.scope)
        if abort is not None:
            abort()


async def serve(gateway: Gateway, scope: Any, receive: Any, send: Any) -> None:
    """A raw WebSocket tab, from handshake to close."""
    ws = WebSocketLink(scope, receive, send)
    headers = ws.headers
    if not gateway.origin_allowed(
        headers.get("origin"), headers.get("host"), ws.url.scheme, headers.get("x-forwarded-proto")
    ):
        await ws.close(code=CloseCode.POLICY_VIOLATION)  # before accept: HTTP 403
        return
    refused = gateway.load_refusal()
    if refused is not None:
        if gateway.draining:
            await ws.close(code=CloseCode.TRY_AGAIN_LATER)
        else:
            status, text = refused
            await ws.send_denial_response(Response(text + "\n", status, headers={"Retry-After": "5"}))
        return
    await ws.accept()
    tab = gateway.open_tab(ws)
    try:
        await gateway.apply(tab, gateway.greet(tab, headers.get("cookie")))
        while not tab.protocol.closed:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                break
            raw = message.get("text")
            if raw is not None:
                gateway.metrics.messages_received.labels("text").inc()
                actions = tab.protocol.on_text(raw)
            else:
                gateway.metrics.messages_received.labels("binary").inc()
                actions = tab.protocol.on_binary()
            await gateway.apply(tab, actions)
        if tab.writer is not None and tab.protocol.closed:
            await asyncio.wait([tab.writer], timeout=2)  # flush the last error, close
    except (WebSocketDisconnect, OSError):  # OSError: uvicorn's ClientDisconnected
        pass
    except Exception:
        log.exception("tab %d: unexpected error; closing it", tab.id)
        gateway.close_after_flush(tab, CloseCode.INTERNAL_ERROR, "internal error")
        if tab.writer is not None:
            await asyncio.wait([tab.writer], timeout=2)
    finally:
        gateway.close_tab(tab)
