"""What a fetcher writes to Redis: a batch's snapshots and messages, events for rooms, resyncs.

One round trip per batch where it can be (`commit_and_publish`): the snapshots' script and the
publishes in one pipeline, on the lean connection outside a Cluster (`shared.resp`: a script
and two publishes cost 106 µs of CPU through redis-py); in a Cluster, whose pipelines take no
scripts, the snapshots first, then the publishes (SPUBLISH: the gateways' channels are sharded).
No pipeline publishes more than PIPELINE_BYTES: each gateway's subscriber is sent what one
pipeline publishes at once, and Redis disconnects one whose output buffer passes 32 MiB.
"""

from __future__ import annotations

from typing import Any

from shared.envelopes import Event, Resync, encode
from shared.keys import Keys
from shared.metrics import FetcherMetrics
from shared.redis_topology import RedisTopology
from shared.resp import Command, DirectCommands

from .cartstate import CartSnapshot, CartState
from .routing import GatewayMessages

PIPELINE_BYTES = 8 * 1024 * 1024  # what one pipeline publishes at most; a single message is never cut


class Publisher:
    def __init__(
        self,
        topology: RedisTopology,
        redis: Any,
        direct: DirectCommands | None,
        keys: Keys,
        cart_state: CartState,
        metrics: FetcherMetrics,
    ) -> None:
        self._topology = topology
        self._redis = redis
        self._direct = direct
        self._keys = keys
        self._cart_state = cart_state
        self._metrics = metrics
        self._publish = "SPUBLISH" if topology.sharded else "PUBLISH"

    async def commit_and_publish(
        self, fresh: list[tuple[str, CartSnapshot]], outgoing: GatewayMessages
    ) -> tuple[list[Any], list[Exception]]:
        """Store the batch's fresh snapshots, then publish its messages (snapshots first: a
        join that follows a push finds its snapshot). Returns the snapshot commands' results and
        the errors of the publishes; every command ran (a pipeline is not a transaction)."""
        stored: list[Any] = []
        errors: list[Exception] = []
        if self._topology.sharded:
            stored = await self._cart_state.store(fresh)
            commands: list[Command] = []
        else:
            commands = self._cart_state.commit_commands(fresh)
        queued = len(commands)
        pipelines: list[list[Command]] = []
        size = 0
        for channel, message in outgoing.messages(self._keys.gateway_channel):
            if size and size + len(message) > PIPELINE_BYTES:
                pipelines.append(commands)
                commands, size = [], 0
            commands.append((self._publish, channel, message))
            size += len(message)
        pipelines.append(commands)
        for pipeline in pipelines:
            if not pipeline:
                continue
            results = await self.pipeline(pipeline)
            stored, results, queued = stored + results[:queued], results[queued:], 0
            errors += [r for r in results if isinstance(r, Exception)]
        return stored, errors

    async def pipeline(self, commands: list[Command]) -> list[Any]:
        """Commands in one round trip, their results (or errors) in order: on the lean
        connection where there is one, else as a redis-py pipeline."""
        if self._direct is not None:
            return await self._direct.execute(commands)
        async with self._redis.pipeline(transaction=False) as pipe:
            for command in commands:
                pipe.execute_command(*command)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            return results

    async def events(self, envelopes: dict[str, Event], kind: str) -> None:
        """One event to each gateway that holds its route (raises if any publish failed)."""
        if not envelopes:
            return
        commands: list[Command] = [
            (self._publish, self._keys.gateway_channel(gateway), encode(envelope))
            for gateway, envelope in envelopes.items()
        ]
        errors = [r for r in await self.pipeline(commands) if isinstance(r, Exception)]
        if errors:
            raise errors[0]
        self._metrics.deliveries_published.labels(kind).inc(len(envelopes))

    async def to_every_gateway(self, envelope: Event | Resync) -> None:
        """A broadcast or a resync, once, on the all-gateways channel."""
        await self._topology.publish(self._redis, self._keys.gateways_channel, encode(envelope))
