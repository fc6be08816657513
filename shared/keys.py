"""Every Redis key and channel the services use, built from one configurable prefix.

Each name says who writes it, who reads it and how long it lives. Session ids never appear in
key names: keys use the session hash (SHA-256 hex of the id, see `shared.protocol.session_hash`).

In a Redis Cluster (`groups` > 0) a script or pipeline may only touch keys of one slot, so keys
carry a hash tag: a route's keys (its owners, `seq` and snapshot) and a copy of the liveness set
are tagged with the route's **key group** (`{g<n>}`, n = `shard_of(route, groups)`), so one
batch script per group sees everything it reads; the fetchers' membership and leases share the
tag `{fetchers}`. On one node or through Sentinel (`groups` = 0) names carry no tag, as always.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.protocol import shard_of

# Fixed by the PHP backend (PROTOCOL.md §6): not prefixed, never renamed. Read by fetchers.
SESSION_MESSAGES_CHANNEL = "session_messages"
NOTIFICATIONS_CHANNEL = "notifications"
ROOM_MESSAGES_CHANNEL = "room_messages"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str = "portico:"
    groups: int = 0  # key groups in a Redis Cluster (`shared.redis_topology.KEY_GROUPS`); 0: untagged

    def group_of(self, route: str) -> int:
        """The key group of a route (a session hash, or a `room:` route); 0 when untagged."""
        return shard_of(route, self.groups) if self.groups else 0

    def _route_prefix(self, route: str) -> str:
        return f"{self.prefix}{{g{self.group_of(route)}}}" if self.groups else self.prefix

    @property
    def _fetchers_prefix(self) -> str:
        return f"{self.prefix}{{fetchers}}" if self.groups else self.prefix

    def route_owners(self, route: str) -> str:
        """ZSET gateway_id -> claim time (ms, Redis clock): the gateways holding a socket of a
        route. A route is a session hash (a session's tabs) or `room:<room id>` (an entity or
        user room, see `shared.protocol.room_route`). Written by gateways (claim/release),
        read by fetchers and gateways (owners, which prune gateways that are not alive). Key
        TTL 1 day, re-claimed every 6 h while held."""
        if route.startswith("room:"):
            return f"{self._route_prefix(route)}{route}:owners"
        return f"{self._route_prefix(route)}session:{route}:owners"

    def session_seq(self, session_hash: str) -> str:
        """STRING last cart `seq` of a session. Written by fetchers only (never below the Redis
        clock in microseconds, so a lost key cannot make seq go backwards). TTL 15 min."""
        return f"{self._route_prefix(session_hash)}session:{session_hash}:seq"

    def session_cart(self, session_hash: str) -> str:
        """STRING msgpack snapshot of the session's latest cart, with its `seq`. Written by
        fetchers after a read, only while that seq is still the session's latest; deleted by
        the next trigger. Read by fetchers to answer joins without PostgreSQL (a deploy does not
        re-read unchanged carts). TTL `CART_SNAPSHOT_TTL_SECONDS`."""
        return f"{self._route_prefix(session_hash)}session:{session_hash}:cart"

    def gateways_alive(self, group: int = 0) -> str:
        """ZSET gateway_id -> liveness expiry (ms, Redis clock). Written by each gateway's
        heartbeat (every ownership TTL / 3), read by every owners lookup: an owner that is not
        alive here does not count (`shared.registry`). In a Cluster one copy per key group
        (`alive_sets`), each beside the routes of its group."""
        if self.groups:
            return f"{self.prefix}{{g{group}}}gateways:alive"
        return f"{self.prefix}gateways:alive"

    @property
    def alive_sets(self) -> list[str]:
        """Every copy of the liveness set (one, untagged, outside a Cluster)."""
        return [self.gateways_alive(g) for g in range(max(self.groups, 1))]

    def gateway_channel(self, gateway_id: str) -> str:
        """CHANNEL msgpack deliveries for one gateway. Published by fetchers (carts, routed
        messages) and gateways (a tab's session_message); read by that gateway only."""
        return f"{self.prefix}gateway:{gateway_id}"

    @property
    def gateways_channel(self) -> str:
        """CHANNEL msgpack messages to every gateway: control ("resync these shards") and
        broadcasts for every socket. Published by fetchers, read by all gateways."""
        return f"{self.prefix}gateways"

    @property
    def fetcher_requests_channel(self) -> str:
        """CHANNEL msgpack requests from gateways (a tab asks for its cart, a tab joined, a gateway
        lost pushes). Published by gateways; every fetcher reads it and serves its own shards."""
        return f"{self.prefix}fetcher:requests"

    @property
    def handover_channel(self) -> str:
        """CHANNEL msgpack markers of shard hand-overs (`services/fetcher/handover.py`). Plain
        pub/sub even in a Cluster, on the connection that carries the PHP backend's channels:
        the marker's place among their messages is the cut. Published and read by fetchers."""
        return f"{self.prefix}fetchers:handover"

    def shard_handover(self, shard: int) -> str:
        """STRING the marker id with which the last holder gave a shard up. Written by that
        fetcher when it frees the lease, read by the next holder. TTL 3 x lease TTL."""
        return f"{self._fetchers_prefix}fetcher:shard:{shard}:handover"

    @property
    def fetchers(self) -> str:
        """ZSET fetcher_id -> heartbeat expiry (ms, Redis clock). Written and read by fetchers to
        size their fair share of shards. Entries past expiry are pruned by the next writer."""
        return f"{self._fetchers_prefix}fetchers"

    @property
    def fetchers_healthy(self) -> str:
        """ZSET fetcher_id -> heartbeat expiry (ms, Redis clock), of the fetchers whose database
        check passes: fair shares are computed over these. Written and read by fetchers."""
        return f"{self._fetchers_prefix}fetchers:healthy"

    @property
    def fetchers_shards(self) -> str:
        """STRING the fleet's SHARDS. Set by the first fetcher, kept alive (3 x lease TTL) by each
        agreeing one; a fetcher with another value holds no shard (`services/fetcher/shards.py`)."""
        return f"{self._fetchers_prefix}fetchers:shards"

    def shard_lease(self, shard: int) -> str:
        """STRING fetcher_id holding a shard of sessions. SET NX PX by fetchers; TTL = lease TTL,
        renewed by the holder; deleted by it on release."""
        return f"{self._fetchers_prefix}fetcher:shard:{shard}"
