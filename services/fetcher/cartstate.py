"""A batch's Redis state in two round trips: owners, `seq` and cart snapshots.

`begin` runs one script for a whole fetch batch. For each session, by its mode:
  * owners: the gateways alive that hold it (`shared.registry`), when events or a push need them;
  * `seq`: the next cart sequence number (above the last, never below the Redis clock in µs, so
    a lost key cannot make seq go backwards), when a cart must be read;
  * the snapshot: the latest cart kept with its seq, served instead of a read when only joins
    and requests ask (a deploy's reconnecting tabs cost no SQL). A trigger deletes it in the
    same script, before anything is read, so a snapshot is never older than the last trigger.
`commit` stores the fresh snapshots, each only if its seq is still the session's latest (a
later trigger already took a newer one), in the pipeline that publishes the batch's envelopes.

Modes are two characters: owners (`o` yes, `-` no), then the cart:
  `-` none (events only)          `c` the snapshot if there is one, else a new seq (joins, gets)
  `n` delete the snapshot, new seq  `p` a trigger: delete the snapshot; a new seq only when some
                                        gateway holds the session (nobody to read it for)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.registry import OWNERS_LUA, decode_names
from shared.resp import Command, DirectCommands

NONE, CACHED_OR_NEW, NEW, PUSH = "-", "c", "n", "p"

_BEGIN = (
    OWNERS_LUA
    + """
local function next_seq(key, ttl)
  local t = redis.call('TIME')
  local floor = tonumber(t[1]) * 1000000 + tonumber(t[2])
  local last = tonumber(redis.call('GET', key) or '0')
  local nxt = math.max(last + 1, floor)
  redis.call('SET', key, string.format('%d', nxt), 'PX', ttl)
  return nxt
end
local now, cache, result = redis_now_ms(), {}, {}
for i = 1, (#KEYS - 1) / 3 do
  local owners_key, seq_key, cart_key = KEYS[3 * i - 1], KEYS[3 * i], KEYS[3 * i + 1]
  local mode = ARGV[i + 1]
  local owners = {}
  if string.sub(mode, 1, 1) == 'o' then owners = live_owners(owners_key, KEYS[1], now, cache) end
  local cart, seq, snapshot = string.sub(mode, 2, 2), 0, false
  if cart == 'c' then
    snapshot = redis.call('GET', cart_key)
    if not snapshot then seq = next_seq(seq_key, ARGV[1]) end
  elseif cart == 'n' or cart == 'p' then
    redis.call('DEL', cart_key)
    if cart == 'n' or #owners > 0 then seq = next_seq(seq_key, ARGV[1]) end
  end
  result[i] = {owners, seq, snapshot}
end
return result
"""
)

# KEYS: (seq key, cart key) per session. ARGV: (seq, snapshot, ttl ms) per session.
_COMMIT = """
local stored = 0
for i = 1, #KEYS / 2 do
  if redis.call('GET', KEYS[2 * i - 1]) == ARGV[3 * i - 2] then
    redis.call('SET', KEYS[2 * i], ARGV[3 * i - 1], 'PX', ARGV[3 * i])
    stored = stored + 1
  end
end
return stored
"""
# An empty cart is what a made-up session id reads (a hostile tab's `update_session` to new ids,
# each kept an hour before budgets bounded them): its snapshot lives only long enough to serve a
# deploy's reconnecting tabs without SQL (they are back within DRAIN_SECONDS). Most visitors'
# carts are empty, so it is kept, not skipped: a drain would otherwise re-read every one of them.
EMPTY_SNAPSHOT_TTL_MS = 5 * 60 * 1000


@dataclass(frozen=True, slots=True)
class CartSnapshot:
    seq: int
    fetched_at: str  # ISO timestamp of the read
    applications_json: str | None  # JSON array text; None when the read failed
    count: int = 0
    error: str | None = None

    def pack(self) -> bytes:
        data: bytes = msgpack.packb([self.seq, self.fetched_at, self.count, self.applications_json])
        return data

    @classmethod
    def unpack(cls, data: bytes) -> CartSnapshot:
        seq, fetched_at, count, applications = msgpack.unpackb(data, raw=False)
        if not (isinstance(seq, int) and isinstance(fetched_at, str) and isinstance(applications, str)):
            raise ValueError("not a cart snapshot")
        return cls(seq, fetched_at, applications, count)


@dataclass(frozen=True, slots=True)
class Begun:
    owners: list[str]
    seq: int  # 0: no cart to read
    snapshot: CartSnapshot | None  # served from Redis: no read


class CartState:
    def __init__(
        self,
        client: aioredis.Redis,
        keys: Keys,
        *,
        seq_ttl_ms: int,
        snapshot_ttl_ms: int,
        direct: DirectCommands | None = None,
    ):
        self._keys = keys
        self._direct = direct  # the lean connection for `begin` (one node, Sentinel)
        self._seq_ttl_ms = seq_ttl_ms
        self._snapshot_ttl_ms = snapshot_ttl_ms
        self._begin = client.register_script(_BEGIN)
        self._commit = client.register_script(_COMMIT)

    async def load_commit_script(self) -> None:
        """Load the commit script on the server (at start, and again after Redis lost its
        script cache: see `commit`)."""
        await self._commit.registered_client.script_load(_COMMIT)

    @property
    def snapshots(self) -> bool:
        return self._snapshot_ttl_ms > 0

    async def begin(self, session_hashes: Sequence[str], modes: Sequence[str]) -> list[Begun]:
        """One script call for the batch; in a Cluster one per key group, side by side."""
        groups: dict[int, list[int]] = {}
        for i, session in enumerate(session_hashes):
            groups.setdefault(self._keys.group_of(session), []).append(i)
        replies = await asyncio.gather(
            *(
                self._begin_group(group, [session_hashes[i] for i in members], [modes[i] for i in members])
                for group, members in groups.items()
            )
        )
        begun: list[Begun | None] = [None] * len(session_hashes)
        for members, group_begun in zip(groups.values(), replies, strict=True):
            for i, one in zip(members, group_begun, strict=True):
                begun[i] = one
        return [b for b in begun if b is not None]

    async def _begin_group(
        self, group: int, session_hashes: Sequence[str], modes: Sequence[str]
    ) -> list[Begun]:
        keys = [self._keys.gateways_alive(group)]
        for session in session_hashes:
            keys += [
                self._keys.route_owners(session),
                self._keys.session_seq(session),
                self._keys.session_cart(session),
            ]
        args: list[Any] = [self._seq_ttl_ms, *modes]
        if self._direct is not None:
            replies = await self._direct.evalsha(self._begin.sha, _BEGIN, keys, args)
        else:
            replies = await self._begin(keys=keys, args=args)
        begun = []
        for owners, seq, snapshot in replies:
            cached = None
            if snapshot is not None:
                try:
                    cached = CartSnapshot.unpack(snapshot)
                except Exception:  # foreign or corrupt: read the cart instead
                    cached = None
            begun.append(Begun(decode_names(owners), int(seq), cached))
        return begun

    def commit_commands(self, fresh: Sequence[tuple[str, CartSnapshot]]) -> list[Command]:
        """The commands (before the batch's publishes, in the same pipeline) that store each
        fresh snapshot while its seq is still the session's latest. Outside a Cluster only (see
        `store`).

        EVALSHA straight away: a script object on a pipeline would cost a SCRIPT EXISTS round
        trip per batch. If the server does not know the script (Redis restarted), this command
        fails alone and the publishes after it still run: the caller loads it again
        (`load_commit_script`); a snapshot is only ever a saving, never needed."""
        return [
            ("EVALSHA", self._commit.sha, len(keys), *keys, *args) for keys, args in self._commit_calls(fresh)
        ]

    async def store(self, fresh: Sequence[tuple[str, CartSnapshot]]) -> list[Any]:
        """`commit` for a Cluster, whose pipelines take no scripts: one call per key group, side
        by side, before the publishes. Returns each call's result or exception."""
        calls = [self._commit(keys=keys, args=args) for keys, args in self._commit_calls(fresh)]
        return list(await asyncio.gather(*calls, return_exceptions=True))

    def _commit_calls(self, fresh: Sequence[tuple[str, CartSnapshot]]) -> list[tuple[list[str], list[Any]]]:
        """The commit script's keys and arguments, per key group (one outside a Cluster)."""
        if not fresh or not self.snapshots:
            return []
        empty_ttl = min(self._snapshot_ttl_ms, EMPTY_SNAPSHOT_TTL_MS)
        groups: dict[int, tuple[list[str], list[Any]]] = {}
        for session, snapshot in fresh:
            keys, args = groups.setdefault(self._keys.group_of(session), ([], []))
            keys += [self._keys.session_seq(session), self._keys.session_cart(session)]
            args += [
                str(snapshot.seq),
                snapshot.pack(),
                empty_ttl if snapshot.count == 0 else self._snapshot_ttl_ms,
            ]
        return list(groups.values())
