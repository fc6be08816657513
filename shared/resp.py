"""Redis's wire protocol over asyncio, read by hiredis: a pub/sub connection and a command connection.

redis-py costs most of the CPU of the fetcher's hot path. Measured on this machine, per call
arriving alone: `PubSub.get_message` 46 µs per message (a coroutine, a timeout scope and a read
per message), a script call 76 µs, a pipeline of a script and two publishes 106 µs; the same
over an asyncio protocol fed to hiredis's reader: 19 to 23 µs per message, 16 to 18 µs per
script call. Every fetcher receives every trigger, and the one that handles it makes a script
call and a pipeline, so this is where a trigger's CPU went. Both kinds here speak RESP2 over
one connection each, with TLS, a unix socket, AUTH (and SELECT for commands) as `REDIS_URL`
says; redis-py stays for everything else (and for a Cluster: `shared/redis_topology.py`).

`PubSubConnection` hands each message to its handler as it is read, in order, inside
`data_received`. A handler may return an awaitable (the gateway's, when an outbox is full):
reading pauses until it is done, so a slow handler pushes back on Redis's output buffer rather
than on our memory. `subscribe` returns once every channel is confirmed; `closed` resolves with
the reason the connection is over: the peer closed it, a reply was an error (MOVED after a slot
moved), the server unsubscribed a sharded channel (`Moved`), or `close()` was called (None).

`CommandConnection` pipelines: every command written at once, replies matched in order, an
error reply returned as redis-py's exception for it (`NoScriptError`, `ResponseError`), not
raised, so that one failed command of a pipeline does not hide the others' results.
`DirectCommands` keeps one open, reconnecting on the next call after a failure.
"""

from __future__ import annotations

import asyncio
import logging
import ssl as ssl_module
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import hiredis
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError

log = logging.getLogger(__name__)

Handler = Callable[[str, bytes], Awaitable[None] | None]
Command = Sequence[str | bytes | int]
C = TypeVar("C", bound="_Connection")


class Moved(RedisError):
    """The node to listen on changed (Sentinel's new master, a slot moved): reconnect now."""


@dataclass(frozen=True)
class RedisAddress:
    """Where one connection goes, and how it authenticates (no secret in `repr`)."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""  # a unix socket instead of host and port
    tls: bool = False
    username: str = field(default="", repr=False)
    password: str = field(default="", repr=False)
    db: int = 0  # commands only (pub/sub knows no databases)


def _pack(parts: Command) -> bytes:
    packed: bytes = hiredis.pack_command(tuple(parts))  # type: ignore[arg-type]  # its stub takes one part
    return packed


def as_exception(reply: hiredis.ReplyError) -> ResponseError:
    """redis-py's exception for an error reply."""
    text = str(reply)
    return NoScriptError(text) if text.startswith("NOSCRIPT") else ResponseError(text)


class _Connection(asyncio.Protocol):
    """What both kinds share: connecting, authenticating, writing, the replies of commands in
    order, and `closed` (see the module docstring)."""

    def __init__(self) -> None:
        self._reader = hiredis.Reader()
        self._transport: asyncio.Transport | None = None
        self._replies: deque[asyncio.Future[Any]] = deque()  # one per command written, in order
        self.closed: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()
        self.last_heard = time.monotonic()

    @classmethod
    async def _connect(cls: type[C], connection: C, address: RedisAddress, timeout: float) -> C:
        loop = asyncio.get_running_loop()
        try:
            if address.path:
                connect = loop.create_unix_connection(lambda: connection, address.path)
            else:
                tls = ssl_module.create_default_context() if address.tls else None
                connect = loop.create_connection(lambda: connection, address.host, address.port, ssl=tls)
            await asyncio.wait_for(connect, timeout)
            if address.password:
                credentials = [address.username, address.password] if address.username else [address.password]
                reply = await asyncio.wait_for(connection._call("AUTH", *credentials), timeout)
                if isinstance(reply, (hiredis.ReplyError, Exception)):  # as read, or as converted
                    raise AuthenticationError(str(reply).split(" ", 1)[0])  # never the password
        except (OSError, TimeoutError) as exc:
            connection.close()
            where = address.path or f"{address.host}:{address.port}"
            raise RedisConnectionError(
                f"cannot connect to {where} ({exc.__class__.__name__}: {exc})"
            ) from None
        except BaseException:
            connection.close()
            raise
        return connection

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        self._finish(None)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's are no asyncio.Transport

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(
            RedisConnectionError(f"connection lost ({exc})" if exc else "connection closed by server")
        )

    def _send(self, *commands: Command) -> list[asyncio.Future[Any]]:
        """Write the commands at once; a future for each one's reply."""
        if self._transport is None or self._transport.is_closing() or self.closed.done():
            raise self._reason()
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in commands]
        self._replies.extend(futures)
        self._transport.write(b"".join(_pack(command) for command in commands))
        return futures

    async def _call(self, *parts: str) -> Any:
        """One command, and its reply (or why the connection ended first)."""
        [reply] = self._send(parts)
        either: set[asyncio.Future[Any]] = {reply, self.closed}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if reply not in done:
            raise self._reason()
        return reply.result()

    def _reply(self, reply: Any) -> bool:
        """A command's reply, if one is awaited (else False: the caller's to handle)."""
        if not self._replies:
            return False
        future = self._replies.popleft()
        if not future.done():
            future.set_result(reply)
        return True

    def _fail(self, reason: BaseException) -> None:
        self._finish(reason)
        if self._transport is not None:
            self._transport.close()

    def _finish(self, reason: BaseException | None) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        error = reason or RedisConnectionError("connection closed")
        for reply in self._replies:
            if not reply.done():
                reply.set_exception(error)
                reply.exception()  # retrieved here: a caller that gave up must not log it
        self._replies.clear()

    def _reason(self) -> BaseException:
        reason = self.closed.result() if self.closed.done() else None
        return reason or RedisConnectionError("connection closed")


class PubSubConnection(_Connection):
    def __init__(self, on_message: Handler, *, sharded: bool) -> None:
        super().__init__()
        self._on_message = on_message
        self._sharded = sharded
        self._data_kind = b"smessage" if sharded else b"message"
        self._paused = False  # a handler's awaitable is running: the replies wait in the reader
        self._finishing: asyncio.Future[None] | None = None
        self._confirming = 0  # (s)subscribe confirmations still expected
        self._confirmed: asyncio.Future[None] | None = None

    @classmethod
    async def open(
        cls, address: RedisAddress, on_message: Handler, *, sharded: bool, timeout: float
    ) -> PubSubConnection:
        return await cls._connect(cls(on_message, sharded=sharded), address, timeout)

    async def subscribe(self, channels: Sequence[str]) -> None:
        """SUBSCRIBE (SSUBSCRIBE when sharded); returns once the server confirmed each channel."""
        self._confirmed = asyncio.get_running_loop().create_future()
        self._confirming = len(channels)
        if self._transport is None or self.closed.done():
            raise self._reason()
        self._transport.write(_pack(("SSUBSCRIBE" if self._sharded else "SUBSCRIBE", *channels)))
        waiting: asyncio.Future[Any] = asyncio.ensure_future(asyncio.shield(self._confirmed))
        either: set[asyncio.Future[Any]] = {waiting, self.closed}
        done, _ = await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if waiting not in done:
            waiting.cancel()
            raise self._reason()

    def ping(self) -> None:
        if self._transport is not None and not self.closed.done():
            self._transport.write(_pack(("PING",)))

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        self._reader.feed(data)
        if not self._paused:
            self._drain()

    def _drain(self) -> None:
        """Handle every complete reply in the reader, until one's handler must be awaited."""
        reader = self._reader
        while not self.closed.done():
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisError(f"protocol error from Redis ({exc})"))
                return
            if reply is False:
                return
            if isinstance(reply, list) and reply and reply[0] == self._data_kind:
                pending = self._on_message(reply[1].decode(), reply[2])
                if pending is not None:
                    self._pause(pending)
                    return
            else:
                self._control(reply)

    def _pause(self, pending: Awaitable[None]) -> None:
        self._paused = True
        if self._transport is not None:
            self._transport.pause_reading()

        async def finish() -> None:
            try:
                await pending
            except Exception:  # the handler's own failure: the connection goes on
                log.exception("pub/sub handler failed; message dropped")
            finally:
                self._paused = False
                if not self.closed.done():
                    self._drain()
                    if not self._paused and self._transport is not None:
                        self._transport.resume_reading()

        self._finishing = asyncio.ensure_future(finish())

    def _control(self, reply: Any) -> None:
        if not isinstance(reply, list):  # AUTH's reply, before subscribing
            if not self._reply(reply) and isinstance(reply, hiredis.ReplyError):
                self._fail(RedisError(str(reply)))  # e.g. MOVED: the slot is another node's now
            return
        kind = reply[0]
        if kind in (b"subscribe", b"ssubscribe"):
            self._confirming -= 1
            if self._confirming == 0 and self._confirmed is not None and not self._confirmed.done():
                self._confirmed.set_result(None)
        elif kind == b"sunsubscribe":
            self._fail(Moved("the server unsubscribed a sharded channel: its slot moved"))
        # b"pong": `last_heard` is all it is for


class CommandConnection(_Connection):
    @classmethod
    async def open(cls, address: RedisAddress, *, timeout: float) -> CommandConnection:
        connection = await cls._connect(cls(), address, timeout)
        if address.db:
            reply = await asyncio.wait_for(connection._call("SELECT", str(address.db)), timeout)
            if isinstance(reply, Exception):  # converted as read (`data_received`)
                connection.close()
                raise reply
        return connection

    def data_received(self, data: bytes) -> None:
        self.last_heard = time.monotonic()
        self._reader.feed(data)
        while True:
            try:
                reply = self._reader.gets()
            except hiredis.ProtocolError as exc:
                self._fail(RedisError(f"protocol error from Redis ({exc})"))
                return
            if reply is False:
                return
            if not self._reply(as_exception(reply) if isinstance(reply, hiredis.ReplyError) else reply):
                self._fail(RedisError("a reply nobody asked for"))
                return

    async def execute(self, commands: Sequence[Command], timeout: float) -> list[Any]:
        """Every command at once; their replies in order (an error reply as its exception)."""
        futures = self._send(*commands)
        done, _ = await asyncio.wait(futures, timeout=timeout)
        if len(done) < len(futures):
            self._fail(RedisConnectionError(f"no reply within {timeout:.0f}s"))  # its order is lost
        return [future.result() for future in futures]


class DirectCommands:
    """One `CommandConnection` kept open for the hot path, opened again on the next call after a
    failure (where: `resolve`, so that Sentinel's new master is found). A call that fails with
    the connection raises `redis.exceptions.ConnectionError`; its caller retries as after any
    Redis failure."""

    def __init__(self, resolve: Callable[[], Awaitable[RedisAddress]], *, timeout: float) -> None:
        self._resolve = resolve
        self._timeout = timeout
        self._connection: CommandConnection | None = None
        self._opening: asyncio.Lock | None = None

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        connection = self._connection
        if connection is None or connection.closed.done():
            connection = await self._open()
        return await connection.execute(commands, self._timeout)

    async def evalsha(self, sha: str, source: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """A script by its hash, loaded first if the server does not know it (a restart)."""
        command = ("EVALSHA", sha, len(keys), *keys, *args)
        [reply] = await self.execute([command])
        if isinstance(reply, NoScriptError):
            [loaded] = await self.execute([("SCRIPT", "LOAD", source)])
            if isinstance(loaded, Exception):
                raise loaded
            [reply] = await self.execute([command])
        if isinstance(reply, Exception):
            raise reply
        return reply

    def reset(self) -> None:
        """Drop the connection: the next call connects to where `resolve` points now."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None

    async def aclose(self) -> None:
        self.reset()

    async def _open(self) -> CommandConnection:
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:  # concurrent callers share one new connection
            if self._connection is None or self._connection.closed.done():
                address = await self._resolve()
                self._connection = await CommandConnection.open(address, timeout=self._timeout)
            return self._connection
