"""`portico-push`: the local stack, and small tools that speak the protocol like PHP and a tab do."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from typing import Any

from services.stackstate import running_stack
from shared.keys import SESSION_MESSAGES_CHANNEL
from shared.protocol import is_valid_session_id, now_iso
from shared.settings import RedisSettings, server_problem


class CommandError(Exception):
    """A mistake or an unreachable server: printed as one line, exit status 1."""


def fail(message: str) -> None:
    print(f"portico-push: {message}", file=sys.stderr)
    raise SystemExit(1)


def _unreachable(what: str, url: str, exc: BaseException) -> CommandError:
    """One line; the hint about `make run` only where nothing answered at all (it misled on a
    403 from the gateway, or on a wrong URL)."""
    refused = (
        isinstance(exc, ConnectionRefusedError)
        or "Connect call failed" in str(exc)
        or ("Connection refused" in str(exc))
    )
    hint = "; is the stack running (make run)?" if refused else ""
    return CommandError(f"{server_problem(what, url, exc)}{hint}")


def checked_url(name: str, url: str, schemes: tuple[str, ...]) -> str:
    """A URL of the right kind, or one line naming the variable (`REDIS_URL=foo` printed a
    ValueError's traceback)."""
    from urllib.parse import urlsplit

    from shared.settings import redact_url

    if urlsplit(url).scheme not in schemes:
        raise CommandError(f"{name} must be a {'/'.join(schemes)} URL, got {redact_url(url)!r}")
    return url


async def publish_trigger(redis: str | RedisSettings, session_id: str) -> int:
    """Publish exactly what the PHP backend publishes (PROTOCOL.md §5.1), to a Redis URL or to
    any topology the services support (plain PUBLISH, as PHP does); returns receivers (in a
    Cluster, those on the node it reached)."""
    import redis.asyncio as aioredis
    from redis.exceptions import RedisError

    from shared.redis_topology import RedisTopology

    where = redis if isinstance(redis, str) else repr(redis)
    topology = None if isinstance(redis, str) else RedisTopology(redis)
    if topology is None:
        client = aioredis.Redis.from_url(str(redis), socket_connect_timeout=3)
    else:
        client = topology.command_client(max_connections=2)
    try:
        payload = {"type": "update_partial_applications", "sessionId": session_id, "timestamp": now_iso()}
        receivers: int = await client.publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))
        return receivers
    except (RedisError, OSError) as exc:
        raise _unreachable("Redis", where, exc) from None
    finally:
        await client.aclose()
        if topology is not None:
            await topology.aclose()


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
    from websockets.exceptions import InvalidStatus

    headers = {"Cookie": f"bookingfrontendsession={session_id}"} if session_id else {}
    try:
        ws = await connect(url, additional_headers=headers, origin=origin, proxy=None, open_timeout=5)  # type: ignore[arg-type]
    except InvalidStatus as exc:
        status = exc.response.status_code
        why = {403: "the Origin is not allowed (--origin)", 503: "it is draining or full"}.get(status, "")
        raise CommandError(
            f"the gateway at {url} refused the connection: HTTP {status} {why}".rstrip()
        ) from None
    except Exception as exc:
        raise _unreachable("the gateway", url, exc) from None
    async with ws:
        print(f"connected to {url}", file=sys.stderr)
        await _print_messages(ws)
    # It used to exit silently when the stack stopped; say why, and fail.
    code, reason = ws.close_code, ws.close_reason
    raise CommandError(f"the gateway closed the connection (code {code}{': ' + reason if reason else ''})")


async def _print_messages(ws: Any) -> None:
    from websockets.exceptions import ConnectionClosed

    try:
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
    except ConnectionClosed:
        pass


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
    watch.add_argument("url", nargs="?", help="default: the running local stack's first gateway")
    watch.add_argument("--session", help="session id sent as the bookingfrontendsession cookie")
    watch.add_argument("--origin", help="Origin header to send (default: none)")
    args = parser.parse_args(argv)

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
        run_command(args)
    except CommandError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        pass


def run_command(args: argparse.Namespace) -> None:
    """Defaults come from the running local stack (`services/stackstate.py`): `make run` may
    have taken other ports than 6390 and 5440, and the CLI's own defaults used to be 6379 and
    5432, so the README's commands missed the stack."""
    stack = running_stack()
    redis_url = checked_url(
        "REDIS_URL", os.environ.get("REDIS_URL") or stack["redis_url"], ("redis", "rediss", "unix")
    )
    if args.command == "trigger":
        receivers = asyncio.run(publish_trigger(redis_url, args.session_id))
        _check_heard(receivers, redis_url)
        print(f"published update_partial_applications ({receivers} fetcher(s) listening)")
    elif args.command == "add-application":
        database_url = checked_url(
            "DATABASE_URL",
            os.environ.get("DATABASE_URL") or stack["database_url"],
            ("postgresql", "postgres"),
        )
        app_id = asyncio.run(add_application(database_url, args.session_id, args.name))
        receivers = asyncio.run(publish_trigger(redis_url, args.session_id))
        _check_heard(receivers, redis_url, f"added application {app_id}, but ")
        print(
            f"added application {app_id}; published update_partial_applications ({receivers} fetcher(s) listening)"
        )
    elif args.command == "listen":
        url = checked_url("the URL", args.url or stack["gateways"][0], ("ws", "wss"))
        asyncio.run(listen(url, args.session, args.origin))


def _check_heard(receivers: int, redis_url: str, prefix: str = "") -> None:
    if receivers == 0:
        from shared.settings import redact_url

        raise CommandError(
            f"{prefix}no fetcher is listening on {redact_url(redis_url)}: nobody will push this "
            "(is the stack running, and is REDIS_URL the stack's Redis?)"
        )


if __name__ == "__main__":
    main()
