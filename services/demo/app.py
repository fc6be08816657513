"""The demo site: the page, the browser client, and a tiny booking backend.

The backend does what the PHP backend does around the push service, and nothing else: it
writes `bb_application` rows for the visitor's session, then publishes
`update_partial_applications` on `session_messages`; it can also publish a `session_targeted`
server message and an entity-room message, to show those paths.
"""

from __future__ import annotations

import json
import os
import random
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from shared.keys import ROOM_MESSAGES_CHANNEL, SESSION_MESSAGES_CHANNEL
from shared.protocol import is_valid_session_id, mask_session_id, now_iso

STATIC = Path(__file__).resolve().parent / "static"
CLIENT_JS = Path(__file__).resolve().parent.parent / "gateway" / "static" / "client.js"
COOKIE = "bookingfrontendsession"
NAMES = ["Korpsøving", "Bursdagsfeiring", "Styremøte", "Håndballtrening", "Konsert & kaffe", "Dugnad"]
DEMO_ROOM = {"entityType": "resource", "entityId": 1}


def create_app(
    database_url: str, redis_url: str, gateways: list[str], *, visitor: str | None = None
) -> Starlette:
    """`visitor`: the session a new visitor gets (the local stack's is `demo-session-1`, the one
    the README's terminal commands change); None: a new session per new visitor, as PHP does."""
    pool: asyncpg.Pool | None = None
    client: aioredis.Redis | None = None

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        nonlocal pool, client
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=4)
        client = aioredis.Redis.from_url(redis_url)
        try:
            yield
        finally:
            await pool.close()
            await client.aclose()

    def db() -> asyncpg.Pool:
        assert pool is not None, "used before start-up"
        return pool

    def redis() -> aioredis.Redis:
        assert client is not None, "used before start-up"
        return client

    def session_of(request: Request) -> str | None:
        sid = request.cookies.get(COOKIE)
        return sid if is_valid_session_id(sid) else None

    async def publish_trigger(session_id: str) -> None:
        payload = {"type": "update_partial_applications", "sessionId": session_id, "timestamp": now_iso()}
        await redis().publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))

    async def page(request: Request) -> Response:
        response = HTMLResponse((STATIC / "index.html").read_text())
        if session_of(request) is None:  # like PHP's session_start(): a new visitor, a new cart
            sid = visitor or secrets.token_hex(16)
            response.set_cookie(COOKIE, sid, httponly=True, samesite="lax", path="/")
        return response

    async def static(request: Request) -> Response:
        name = request.path_params["name"]
        path = CLIENT_JS if name == "client.js" else STATIC / name
        if name not in ("client.js", "demo.js", "demo.css") or not path.exists():
            return Response(status_code=404)
        media = "text/css" if name.endswith(".css") else "text/javascript"
        return FileResponse(path, media_type=media, headers={"Cache-Control": "no-cache"})

    async def config(request: Request) -> Response:
        sid = session_of(request)
        return JSONResponse(
            {"gateways": gateways, "session": mask_session_id(sid) if sid else None, "room": DEMO_ROOM}
        )

    async def add_application(request: Request) -> Response:
        sid = session_of(request)
        if sid is None:
            return JSONResponse({"error": "no session cookie; reload the page"}, status_code=400)
        async with db().acquire() as conn, conn.transaction():
            resource = random.choice([1, 2])
            app_id = await conn.fetchval(
                """
                INSERT INTO bb_application (status, modified, building_name, building_id, activity_id, name,
                  contact_name, contact_email, contact_phone, secret, owner_id, session_id)
                VALUES ('NEWPARTIAL1', now()::timestamp(0), 'Fana kulturhus', 1, 1, $1, 'Demo', 'demo@example.no',
                        '0', md5(random()::text), 0, $2)
                RETURNING id""",
                random.choice(NAMES),
                sid,
            )
            start = random.randint(1, 60)
            await conn.execute(
                "INSERT INTO bb_application_date (application_id, from_, to_) VALUES "
                "($1, date_trunc('day', now()) + make_interval(days => $2, hours => 17), "
                "date_trunc('day', now()) + make_interval(days => $2, hours => 19))",
                app_id,
                start,
            )
            await conn.execute(
                "INSERT INTO bb_application_resource (application_id, resource_id) VALUES ($1, $2)",
                app_id,
                resource,
            )
            order_id = await conn.fetchval(
                "INSERT INTO bb_purchase_order (application_id) VALUES ($1) RETURNING id", app_id
            )
            hours = random.randint(1, 3)
            await conn.execute(
                """INSERT INTO bb_purchase_order_line (order_id, parent_mapping_id, article_mapping_id, unit_price,
                     currency, quantity, amount, tax_code, tax)
                   VALUES ($1, 1, 1, 250.00, 'NOK', $2, 250.00 * $2, 3, 62.50 * $2)""",
                order_id,
                hours,
            )
        await publish_trigger(sid)
        return JSONResponse({"id": app_id}, status_code=201)

    async def remove_application(request: Request) -> Response:
        sid = session_of(request)
        app_id = int(request.path_params["app_id"])
        if sid is None:
            return JSONResponse({"error": "no session cookie"}, status_code=400)
        async with db().acquire() as conn, conn.transaction():
            owned = await conn.fetchval(
                "SELECT id FROM bb_application WHERE id = $1 AND session_id = $2 AND status = 'NEWPARTIAL1'",
                app_id,
                sid,
            )
            if owned is None:
                return JSONResponse({"error": "not in your cart"}, status_code=404)
            await conn.execute(
                """
                DELETE FROM bb_purchase_order_line WHERE order_id IN
                  (SELECT id FROM bb_purchase_order WHERE application_id = $1);
                """.strip(),
                app_id,
            )
            for table, column in [
                ("bb_purchase_order", "application_id"),
                ("bb_application_date", "application_id"),
                ("bb_application_resource", "application_id"),
                ("bb_application_agegroup", "application_id"),
                ("bb_application_targetaudience", "application_id"),
                ("bb_document_application", "owner_id"),
            ]:
                await conn.execute(f"DELETE FROM {table} WHERE {column} = $1", app_id)
            await conn.execute("DELETE FROM bb_application WHERE id = $1", app_id)
        await publish_trigger(sid)
        return Response(status_code=204)

    async def send_toast(request: Request) -> Response:
        sid = session_of(request)
        if sid is None:
            return JSONResponse({"error": "no session cookie"}, status_code=400)
        message = {
            "type": "server_message",
            "action": "new",
            "messages": [
                {
                    "id": secrets.randbelow(10**6),
                    "type": "info",
                    "title": "Melding",
                    "text": "Hei fra saksbehandler!",
                }
            ],
        }
        await redis().publish(
            SESSION_MESSAGES_CHANNEL,
            json.dumps({"type": "session_targeted", "sessionId": sid, "data": message}),
        )
        return Response(status_code=202)

    async def post_to_room(request: Request) -> Response:
        room = f"entity_{DEMO_ROOM['entityType']}_{DEMO_ROOM['entityId']}"
        message = {
            "type": "room_message",
            "roomId": room,
            "action": "updated",
            "message": "Storsal has a new booking",
        }
        await redis().publish(ROOM_MESSAGES_CHANNEL, json.dumps(message))
        return Response(status_code=202)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/static/{name}", static),
            Route("/api/config", config),
            Route("/api/applications", add_application, methods=["POST"]),
            Route("/api/applications/{app_id:int}", remove_application, methods=["DELETE"]),
            Route("/api/toast", send_toast, methods=["POST"]),
            Route("/api/room-message", post_to_room, methods=["POST"]),
        ],
        lifespan=lifespan,
    )


def main() -> None:
    import uvicorn

    gateways = [g.strip() for g in os.environ.get("DEMO_GATEWAYS", ":8080,:8081").split(",") if g.strip()]
    app = create_app(
        os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"),
        gateways,
        visitor=os.environ.get("DEMO_SESSION") or None,
    )
    uvicorn.run(
        app,
        host=os.environ.get("DEMO_HOST", "127.0.0.1"),
        port=int(os.environ.get("DEMO_PORT", "8000")),
        log_config=None,
    )


if __name__ == "__main__":
    main()
