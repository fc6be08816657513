"""Relays: a tab's message to the *other* tabs of its session or entity room, on every gateway.

A `session_message` goes to the session's other tabs as a `room_message`; a `room_message` to
an entity room's other members (the co-editing page's presence). Tabs here get it at once; the
other gateways that hold the route get one `Event` each, published in one pipeline.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.envelopes import Event, encode
from shared.keys import Keys
from shared.protocol import room_route
from shared.redis_topology import RedisTopology
from shared.registry import RedisOwnershipRegistry

from .hub import Hub
from .outbox import Outgoing
from .tab import Tab
from .writer import Writer

log = logging.getLogger(__name__)


class Relays:
    def __init__(
        self,
        hub: Hub[Tab],
        writer: Writer,
        registry: RedisOwnershipRegistry,
        redis: aioredis.Redis,
        topology: RedisTopology,
        keys: Keys,
        gateway_id: str,
    ) -> None:
        self._hub = hub
        self._writer = writer
        self._registry = registry
        self._redis = redis
        self._topology = topology
        self._keys = keys
        self._gateway_id = gateway_id

    async def to_session(self, sender: Tab, text: str) -> None:
        """A tab's session_message (as the `room_message` text to deliver), to the other tabs of
        its session on every gateway."""
        session = sender.session_hash
        if session is not None:
            members = self._hub.session_members(session)
            await self._relay(sender, members, session, Event(text, session_hash=session))

    async def to_room(self, sender: Tab, room: str, text: str) -> None:
        """A member's room_message, to the *other* members of an entity room on every gateway."""
        await self._relay(sender, self._hub.room_members(room), room_route(room), Event(text, room=room))

    async def _relay(self, sender: Tab, members: Iterable[Tab], route: str, event: Event) -> None:
        outgoing = Outgoing(event.text, "room_message")
        # A copy: a slow member dropped here leaves the live set (and that raised inside the
        # sender's own loop, which closed the *sender* 1011). A full outbox gets its writer's
        # turn first, as in a fan-out (`Writer.settle`): a burst of relays is not a slow tab.
        full = [
            (o, outgoing) for o in list(members) if o is not sender and not self._writer.offer(o, outgoing)
        ]
        if full:
            await self._writer.settle(full)
        try:
            owners = [g for g in await self._registry.owners(route) if g != self._gateway_id]
            if not owners:
                return
            message = encode(event)
            async with self._redis.pipeline(transaction=False) as pipe:
                for gateway in owners:
                    self._topology.publish(pipe, self._keys.gateway_channel(gateway), message)
                await pipe.execute()
        except RedisError as exc:
            log.warning("relay not sent to other gateways (%s)", exc)
