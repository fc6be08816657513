"""The lean Redis connections (`shared/resp.py`) against real Redis servers: what REDIS_URL may
say (a password, a user, a unix socket, a database), error replies, and a handler that waits.

They replace redis-py on the hot paths (a pub/sub message cost 46 µs of CPU through it, a script
call 76 µs), so everything redis-py did for those paths must still hold here.
"""

from __future__ import annotations

import asyncio
import os
import tempfile

import pytest
import redis
from redis.exceptions import AuthenticationError, NoScriptError, ResponseError

from services.localservers import LocalRedis
from shared.redis_topology import RedisTopology
from shared.resp import CommandConnection, DirectCommands, PubSubConnection, RedisAddress
from shared.settings import RedisSettings
from tests.support.data import seed_reference
from tests.support.stack import a_change_reaches_every_gateway, running_stack
from tests.support.waiting import eventually

pytestmark = pytest.mark.anyio
PASSWORD = "s3cret-pw"


@pytest.fixture
def guarded_redis():
    """A Redis that wants a password, listening on TCP and on a unix socket."""
    socket_dir = tempfile.mkdtemp(prefix="portico-sock-")
    path = os.path.join(socket_dir, "redis.sock")
    server = LocalRedis(
        extra_args=("--requirepass", PASSWORD, "--unixsocket", path, "--unixsocketperm", "700")
    )
    server.start()
    try:
        yield server, path
    finally:
        server.cleanup()
        os.rmdir(socket_dir)


async def test_what_redis_url_says_reaches_both_connections(guarded_redis):
    server, path = guarded_redis
    for url in (
        f"redis://:{PASSWORD}@127.0.0.1:{server.port}/3",
        f"redis://default:{PASSWORD}@127.0.0.1:{server.port}/3",
        f"unix://:{PASSWORD}@{path}?db=3",
    ):
        topology = RedisTopology(RedisSettings(url=url, prefix="t:"))
        address = await topology.subscriber_address("any")
        assert address.db == 3 and PASSWORD not in repr(address)
        direct = DirectCommands(lambda address=address: _resolved(address), timeout=5)
        assert await direct.execute([("SET", "resp-key", url), ("GET", "resp-key")]) == [b"OK", url.encode()]
        await direct.aclose()
        plain = redis.Redis(port=server.port, password=PASSWORD, db=3)
        assert plain.get("resp-key") == url.encode(), "in the database REDIS_URL names"
        assert redis.Redis(port=server.port, password=PASSWORD, db=0).get("resp-key") is None

        await _one_message_through(address, plain)


async def _one_message_through(address: RedisAddress, publisher: redis.Redis) -> None:
    received: list[tuple[str, bytes]] = []
    connection = await PubSubConnection.open(
        address, lambda c, d: received.append((c, d)), sharded=False, timeout=5
    )
    try:
        await connection.subscribe(["resp-channel"])
        publisher.publish("resp-channel", b"hello")
        await eventually(lambda: received == [("resp-channel", b"hello")], 5)
    finally:
        connection.close()


async def _resolved(address: RedisAddress) -> RedisAddress:
    return address


async def test_a_wrong_password_is_an_authentication_error_that_names_no_password(guarded_redis):
    server, _ = guarded_redis
    address = RedisAddress(port=server.port, password="not-the-one")
    for opening in (
        CommandConnection.open(address, timeout=5),
        PubSubConnection.open(address, lambda c, d: None, sharded=False, timeout=5),
    ):
        with pytest.raises(AuthenticationError) as caught:
            await opening
        assert "not-the-one" not in str(caught.value)


async def test_error_replies_stay_in_their_place_in_a_pipeline(redis_url):
    server_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    connection = await CommandConnection.open(RedisAddress(port=server_port), timeout=5)
    try:
        results = await connection.execute(
            [
                ("SET", "resp-a", "1"),
                ("EVALSHA", "0" * 40, 0),
                ("INCR", "resp-missing-type"),
                ("LPUSH", "resp-a", "x"),
            ],
            timeout=5,
        )
        assert results[0] == b"OK" and results[2] == 1
        assert isinstance(results[1], NoScriptError)
        assert isinstance(results[3], ResponseError) and "WRONGTYPE" in str(results[3])
        direct = DirectCommands(lambda: _resolved(RedisAddress(port=server_port)), timeout=5)
        source = "return ARGV[1]"
        redis.Redis(port=server_port).script_flush()
        sha = redis.Redis(port=server_port).script_load(source)
        redis.Redis(port=server_port).script_flush()  # as after a restart: NOSCRIPT, then loaded
        assert await direct.evalsha(sha, source, [], ["back"]) == b"back"
        await direct.aclose()
    finally:
        connection.close()


async def test_a_handler_that_waits_pauses_reading_and_keeps_the_order(redis_url):
    """The gateway's fan-out waits when an outbox is full; the messages after it must wait too,
    and come in order, not be handled beside it."""
    server_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    seen: list[bytes] = []
    gate = asyncio.Event()

    async def wait_for_gate() -> None:
        await gate.wait()

    def handle(channel: str, data: bytes) -> asyncio.Future[None] | None:
        seen.append(data)
        return asyncio.ensure_future(wait_for_gate()) if data == b"2" else None

    connection = await PubSubConnection.open(RedisAddress(port=server_port), handle, sharded=False, timeout=5)
    try:
        await connection.subscribe(["resp-order"])
        publisher = redis.Redis(port=server_port)
        for n in range(1, 6):
            publisher.publish("resp-order", str(n))
        await eventually(lambda: seen == [b"1", b"2"], 5)
        await asyncio.sleep(0.2)
        assert seen == [b"1", b"2"], "nothing after the message whose handler waits"
        gate.set()
        await eventually(lambda: seen == [b"1", b"2", b"3", b"4", b"5"], 5)
    finally:
        connection.close()


async def test_the_services_on_a_redis_that_wants_a_password(guarded_redis, database_url, prefix, db):
    """The whole push path with REDIS_URL carrying a password and a database: the lean
    connections authenticate and select as redis-py's clients do."""
    server, _ = guarded_redis
    await seed_reference(db)
    url = f"redis://:{PASSWORD}@127.0.0.1:{server.port}/2"
    async with running_stack(url, database_url, prefix) as stack:
        await a_change_reaches_every_gateway(stack, db, url, "guardedSession00001")
    assert redis.Redis(port=server.port, password=PASSWORD, db=2).dbsize() > 0
