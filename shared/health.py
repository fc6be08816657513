"""The HTTP endpoints every service exposes: /healthz, /readyz, /metrics.

Liveness never looks at Redis or PostgreSQL (an outage must not become a restart storm);
readiness does, through the `ready` callable of the service.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.metrics import CONTENT_TYPE_LATEST, render


def health_routes(ready: Callable[[], dict[str, bool]], registry: CollectorRegistry) -> list[Route]:
    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks = ready()
        ok = all(checks.values())
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        return Response(render(registry), media_type=CONTENT_TYPE_LATEST)

    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics),
    ]
