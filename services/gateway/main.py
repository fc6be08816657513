"""`portico-gateway`: run one gateway, configured only by environment variables."""

from __future__ import annotations

import socket

import uvicorn

from shared.logconfig import configure_logging
from shared.redis_clients import speedups_enabled
from shared.settings import GatewaySettings, load_or_exit

from .asgi import GatewayApp, create_app
from .gateway import Gateway
from .shutdown import shutdown_seconds
from .uvicorn_protocols import HTTPTOOLS, MAX_HEAD_BYTES, AbortableWebSocketProtocol, with_request_timeout


class GatewayServer(uvicorn.Server):
    """uvicorn's shutdown closes every WebSocket at once (1012) before the app's shutdown runs.
    Ours first stops listening, then drains the sockets paced over DRAIN_SECONDS
    (`Gateway.drain`), then lets uvicorn finish."""

    @property
    def app(self) -> GatewayApp:
        """The running app (under uvicorn's middleware)."""
        app = self.config.loaded_app
        while not isinstance(app, GatewayApp):
            app = app.app
        return app

    @property
    def gateway(self) -> Gateway:
        return self.app.gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()  # stop accepting: the load balancer sends new tabs elsewhere
        await self.gateway.drain()
        await super().shutdown(sockets)


def event_loop_and_parser() -> tuple[str, str]:
    """uvloop and httptools when installed, as production uvicorn deployments run; else the
    standard asyncio loop and h11 (`make bench` measures both)."""
    if not speedups_enabled():
        return "asyncio", "h11"
    return "auto", "httptools" if HTTPTOOLS else "h11"


def uvicorn_config(settings: GatewaySettings, **overrides: object) -> uvicorn.Config:
    loop, _parser = event_loop_and_parser()
    options: dict[str, object] = {
        "host": settings.host,
        "port": settings.port,
        "loop": loop,
        "http": with_request_timeout(settings.handshake_timeout_seconds, plain=_parser == "h11"),
        "h11_max_incomplete_event_size": MAX_HEAD_BYTES,  # httptools: the protocol class bounds it
        "ws": AbortableWebSocketProtocol,  # websockets-sansio, plus abort for unwritable peers
        "ws_max_size": settings.max_frame_bytes,  # larger frames: close 1009
        "ws_ping_interval": settings.ws_ping_interval_seconds,
        "ws_ping_timeout": settings.ws_ping_interval_seconds,
        "ws_per_message_deflate": settings.per_message_deflate,
        "log_config": None,
        "lifespan": "on",
        "timeout_graceful_shutdown": shutdown_seconds(settings.drain_seconds),
        "proxy_headers": False,
        "server_header": False,
    }
    options.update(overrides)
    return uvicorn.Config(create_app(settings), **options)  # type: ignore[arg-type]


def main() -> None:
    settings = load_or_exit(GatewaySettings, "portico-gateway")
    configure_logging(settings.log_level, f"gateway[{settings.gateway_id}]")
    GatewayServer(uvicorn_config(settings)).run()


if __name__ == "__main__":
    main()
