"""A TCP proxy for fault injection: cut every connection, refuse new ones, count PG messages.

`count_pg_messages` counts the frontend messages of the PostgreSQL wire protocol sent through
it by type byte (`S` Sync ends each extended-protocol round trip, `Q` is a simple query).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import Counter

from services.localservers import free_port


class TcpProxy:
    def __init__(self, target_port: int, *, count_pg_messages: bool = False) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.count_pg_messages = count_pg_messages
        self.messages: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._pipes: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)
        return self

    async def cut(self) -> None:
        """Stop listening and drop every open connection (like a network partition + RST)."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            with contextlib.suppress(Exception):
                writer.transport.abort()
        for task in list(self._pipes):
            task.cancel()

    async def restore(self) -> None:
        await self.start()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        upstream = asyncio.create_task(self._pipe(reader, up_writer, count=self.count_pg_messages))
        downstream = asyncio.create_task(self._pipe(up_reader, writer, count=False))
        self._pipes.update((upstream, downstream))
        for task in (upstream, downstream):
            task.add_done_callback(self._pipes.discard)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, count: bool) -> None:
        buffer = b""
        started = False  # the startup message has no type byte
        try:
            while data := await reader.read(65536):
                if count:
                    buffer += data
                    buffer, started = self._count(buffer, started)
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            with contextlib.suppress(Exception):
                writer.close()

    def _count(self, buffer: bytes, started: bool) -> tuple[bytes, bool]:
        while True:
            if not started:
                if len(buffer) < 4:
                    return buffer, started
                length = int.from_bytes(buffer[:4], "big")
                if len(buffer) < length:
                    return buffer, started
                code = int.from_bytes(buffer[4:8], "big")
                buffer = buffer[length:]
                started = code != 80877103  # SSLRequest is followed by the real startup message
                continue
            if len(buffer) < 5:
                return buffer, started
            length = int.from_bytes(buffer[1:5], "big")
            if len(buffer) < 1 + length:
                return buffer, started
            self.messages[chr(buffer[0])] += 1
            buffer = buffer[1 + length :]

    @property
    def round_trips(self) -> int:
        return self.messages["S"] + self.messages["Q"]
