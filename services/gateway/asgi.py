"""The gateway wired together: the core, both transports and the HTTP routes, as one ASGI app.

WebSocket handshakes on the raw paths go straight to `websocket_transport.serve`, the Socket.IO
paths to `SocketIOTransport`, everything else (HTTP routes, lifespan) to Starlette. Starlette's
middleware and router each kept a suspended coroutine frame for as long as a socket lived;
skipping them makes an idle tab smaller (`make bench`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from shared.health import health_routes
from shared.settings import GatewaySettings

from . import websocket_transport
from .gateway import Gateway
from .socketio_transport import SocketIOTransport
from .vendor import BUNDLE_MISSING, SOCKETIO_BUNDLE

CLIENT_JS = Path(__file__).resolve().parent / "static" / "client.js"
SOCKET_PATHS = frozenset({"/wss", "/wss/", "/"})
# Socket.IO: `/wss/socket.io/` as the frontend connects, `/socket.io/` behind a proxy that strips
# `/wss`. The bundle (`socket.io.js`) is a plain HTTP route under both.
SOCKETIO_PREFIXES = ("/wss/socket.io", "/socket.io")


class GatewayApp:
    """The gateway's ASGI entry (see the module's docstring)."""

    def __init__(self, app: Starlette, gateway: Gateway, socketio: SocketIOTransport) -> None:
        self.app, self.gateway, self.socketio, self.state = app, gateway, socketio, app.state

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "websocket" and path in SOCKET_PATHS:
            await websocket_transport.serve(self.gateway, scope, receive, send)
        elif scope["type"] in ("http", "websocket") and _is_socketio_path(path):
            await self.socketio(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def _is_socketio_path(path: str) -> bool:
    return any(path in (prefix, prefix + "/") for prefix in SOCKETIO_PREFIXES)


def create_app(settings: GatewaySettings) -> GatewayApp:
    gateway = Gateway(settings)
    socketio = SocketIOTransport(gateway)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await gateway.start(socketio.loops())
        try:
            yield
        finally:
            await gateway.stop()

    def ready() -> dict[str, bool]:
        return {
            "redis_subscription": gateway.subscription.healthy,
            "redis_commands": gateway.topology.commands_healthy,
            "not_draining": not gateway.draining,
            "background_tasks": gateway.failure is None,
        }

    async def client_js(request: Request) -> Response:
        # A public static module; CORS so that a page on the booking site's origin can import it.
        return FileResponse(
            CLIENT_JS,
            media_type="text/javascript",
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=300"},
        )

    async def socketio_bundle(request: Request) -> Response:
        # The official socket.io-client browser bundle, fetched from npm and checked against
        # its published integrity hash at install time (`services/gateway/vendor.py`).
        if not SOCKETIO_BUNDLE.is_file():
            return Response(f"{BUNDLE_MISSING}\n", 404, media_type="text/plain")
        return FileResponse(
            SOCKETIO_BUNDLE,
            media_type="text/javascript",
            headers={"Access-Control-Allow-Origin": "*", "Cache-Control": "public, max-age=3600"},
        )

    routes = [
        Route("/wss/client.js", client_js),
        Route("/client.js", client_js),
        Route("/wss/socket.io/socket.io.js", socketio_bundle),
        Route("/socket.io/socket.io.js", socketio_bundle),
        *health_routes(ready, gateway.metrics.registry, lambda: gateway.failure),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.gateway = gateway
    app.state.socketio = socketio
    return GatewayApp(app, gateway, socketio)
