"""`portico-push`: the local stack, and small tools that speak the protocol like PHP and a tab do."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys

from shared.keys import SESSION_MESSAGES_CHANNEL
from shared.protocol import is_valid_session_id, now_iso
from shared.settings import server_problem

DEFAULT_REDIS = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE = "postgresql://postgres@127.0.0.1:5432/postgres"


class CommandError(Exception):
    """A mistake or an unreachable server: printed as one line, exit status 1."""


def fail(message: str) -> None:
    print(f"portico-push: {message}", file=sys.stderr)
    raise SystemExit(1)


def _unreachable(what: str, url: str, exc: BaseException) -> CommandError:
    return CommandError(f"{server_problem(what, url, exc)}; is the stack running (make run)?")


async def publish_trigger(redis_url: str, session_id: str) -> int:
    """Publish exactly what the PHP backend publishes (PROTOCOL.md §5.1); returns receivers."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    client = aioredis.Redis.from_url(redis_url, socket_connect_timeout=3)
    try:
        payload = {"type": "update_partial_applications", "sessionId": session_id, "timestamp": now_iso()}
        receivers: int = await client.publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))
        return receivers
    except (RedisError, OSError) as exc:
        raise _unreachable("Redis", redis_url, exc) from None
    finally:
        await client.aclose()


async def add_application(database_url: str, session_id: str, name: str) -> int:
    import asyncpg

    try:
        conn = await asyncpg.connect(database_url, timeout=5)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise _unreachable("PostgreSQL", database_url, exc) from None
    try:
        app_id: int = await conn.fetchval(
            """
            INSERT INTO bb_application (status, modified, building_name, building_id, activity_id, name,
                                        contact_name, contact_email, contact_phone, secret, owner_id, session_id)
            VALUES ('NEWPARTIAL1', now(), 'Fana kulturhus', 1, 1, $1, 'Demo', 'demo@example.no', '0',
                    md5(random()::text), 0, $2)
            RETURNING id
            """,
            name,
            session_id,
        )
        await conn.execute(
            "INSERT INTO bb_application_date (application_id, from_, to_) "
            "VALUES ($1, date_trunc('hour', now()) + interval '1 day', date_trunc('hour', now()) + interval '26 hours')",
            app_id,
        )
        await conn.execute(
            "INSERT INTO bb_application_resource (application_id, resource_id) VALUES ($1, 1)", app_id
        )
        return app_id
    except asyncpg.UndefinedTableError:
        raise CommandError("the database has no Portico tables (make run loads them)") from None
    finally:
        await conn.close()


async def listen(url: str, session_id: str | None, origin: str | None) -> None:
    from websockets.asyncio.client import connect

    headers = {"Cookie": f"bookingfrontendsession={session_id}"} if session_id else {}
    try:
        ws = await connect(url, additional_headers=headers, origin=origin, proxy=None, open_timeout=5)  # type: ignore[arg-type]
    except Exception as exc:
        raise _unreachable("the gateway", url, exc) from None
    async with ws:
        print(f"connected to {url}", file=sys.stderr)
        async for raw in ws:
            message = json.loads(raw)
            if message.get("type") == "partial_applications_response" and isinstance(
                message.get("data"), dict
            ):
                data = message["data"]
                names = [a.get("name") for a in data.get("applications", [])]
                print(
                    f"{message['type']} seq={data.get('seq')} source={data.get('source')} "
                    f"count={data.get('count')} error={data.get('error')} {names}",
                    flush=True,
                )
            else:
                print(raw, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="portico-push", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser(
        "stack", help="run Redis, PostgreSQL, 2 gateways, 2 fetchers and the demo site locally"
    )
    commands.add_parser(
        "demo", help="run the demo booking page (DATABASE_URL, REDIS_URL, DEMO_GATEWAYS, DEMO_PORT)"
    )
    trigger = commands.add_parser("trigger", help="publish update_partial_applications like PHP does")
    trigger.add_argument("session_id")
    add = commands.add_parser("add-application", help="add a partial application to a cart, then trigger")
    add.add_argument("session_id")
    add.add_argument("--name", default="Demo booking")
    watch = commands.add_parser("listen", help="connect like a browser tab and print what arrives")
    watch.add_argument("url", nargs="?", default="ws://127.0.0.1:8080/wss")
    watch.add_argument("--session", help="session id sent as the bookingfrontendsession cookie")
    watch.add_argument("--origin", help="Origin header to send (default: none)")
    args = parser.parse_args(argv)

    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS)
    if args.command == "stack":
        from services.devstack import run_stack

        raise SystemExit(run_stack())
    if args.command == "demo":
        from services.demo.app import main as run_demo

        run_demo()
        return
    if args.command in ("trigger", "add-application") and not is_valid_session_id(args.session_id):
        parser.error("session_id must be 1-128 characters of A-Z, a-z, 0-9, ',' and '-'")
    try:
        run_command(args, redis_url)
    except CommandError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def run_command(args: argparse.Namespace, redis_url: str) -> None:
    if args.command == "trigger":
        receivers = asyncio.run(publish_trigger(redis_url, args.session_id))
        _check_heard(receivers, redis_url)
        print(f"published update_partial_applications ({receivers} fetcher(s) listening)")
    elif args.command == "add-application":
        app_id = asyncio.run(
            add_application(os.environ.get("DATABASE_URL", DEFAULT_DATABASE), args.session_id, args.name)
        )
        receivers = asyncio.run(publish_trigger(redis_url, args.session_id))
        _check_heard(receivers, redis_url, f"added application {app_id}, but ")
        print(
            f"added application {app_id}; published update_partial_applications ({receivers} fetcher(s) listening)"
        )
    elif args.command == "listen":
        asyncio.run(listen(args.url, args.session, args.origin))


def _check_heard(receivers: int, redis_url: str, prefix: str = "") -> None:
    if receivers == 0:
        from shared.settings import redact_url

        raise CommandError(
            f"{prefix}no fetcher is listening on {redact_url(redis_url)}: nobody will push this "
            "(is the stack running, and is REDIS_URL the stack's Redis?)"
        )


if __name__ == "__main__":
    main()
