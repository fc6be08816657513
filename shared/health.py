"""The HTTP endpoints every service exposes: /healthz, /readyz, /metrics.

Liveness never looks at Redis or PostgreSQL (an outage must not become a restart storm);
it fails only when the process itself is broken: an essential background loop died
(`failure` returns why). Readiness looks at Redis and PostgreSQL, through `ready`.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from shared.metrics import CONTENT_TYPE_LATEST, render


def health_routes(
    ready: Callable[[], dict[str, bool]],
    registry: CollectorRegistry,
    failure: Callable[[], str | None] = lambda: None,
) -> list[Route]:
    async def healthz(request: Request) -> Response:
        reason = failure()
        if reason is not None:
            return JSONResponse({"status": "failed", "reason": reason}, status_code=503)
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
