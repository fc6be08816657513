"""Shard hand-overs without a lost or a doubled event: a marker in the message stream is the cut.

Every fetcher receives every message of the PHP backend's channels, in the same order: one
connection per fetcher, and the same node for all (one Redis; in a Cluster the primary of the
channels' slot, `shared.redis_topology`). A fetcher that gives shards up publishes a **marker**
on `Keys.handover_channel`, which that same connection carries; the marker's place among the
messages is where the shards change hands:

  * the giver serves those shards' messages up to its marker and stops at it, in the message
    loop itself (`on_marker` calls `on_cut` before the next message is read); then it lets its
    running work finish and frees the leases, writing the marker's id beside each
    (`Keys.shard_handover`);
  * every other fetcher keeps the messages of those shards that come after the marker
    (bounded: `KEEP_SECONDS`, `KEEP_BYTES` in all);
  * the fetcher that claims such a shard reads its marker id (`adopt`): if the marker reached it
    already, it replays what it kept since, then serves live; if not yet, it serves from the
    marker on (what came before was the giver's). A marker that never comes (its subscription
    was down) is waited for `AWAIT_SECONDS`, then the shard is served anyway.

Before this, one lease tick passed between a release and the next claim, and events of that
window were lost (23 of 400 in the suite's graceful join + leave). A fetcher that *dies*
leaves no marker: its shards are served again once its leases expire, and the events between
are lost (bounded by `LEASE_TTL_SECONDS`; carts are fetched again anyway: the claimer announces
the shards and the gateways ask again).
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable

import msgpack

log = logging.getLogger(__name__)

CUT_SECONDS = 2.0  # how long a giver waits for its own marker to come back before it stops anyway
AWAIT_SECONDS = 5.0  # how long a claimer waits for a marker it has not seen yet
KEEP_SECONDS = 10.0  # how long the messages after another fetcher's marker are kept
KEEP_BYTES = 32 * 1024 * 1024  # in all shards together; past it, messages are not kept (counted)

Message = tuple[str, bytes]  # (channel, payload) as received
WAITING = ""  # the marker id of messages kept while a claimer waits for a marker it has not seen


def encode_marker(marker_id: str, giver: str, shards: list[int]) -> bytes:
    data: bytes = msgpack.packb([marker_id, giver, shards])
    return data


def decode_marker(data: bytes) -> tuple[str, str, list[int]] | None:
    """(marker id, giver, shards), or None for anything that is not a marker."""
    try:
        marker_id, giver, shards = msgpack.unpackb(data, raw=False)
    except Exception:
        return None
    if not (isinstance(marker_id, str) and isinstance(giver, str) and isinstance(shards, list)):
        return None
    if not all(isinstance(n, int) and not isinstance(n, bool) and 0 <= n < 1 << 16 for n in shards):
        return None
    return marker_id, giver, shards


class Handovers:
    """One fetcher's side of the hand-overs (see the module docstring)."""

    def __init__(
        self,
        fetcher_id: str,
        *,
        publish: Callable[[bytes], Awaitable[object]],
        on_cut: Callable[[list[int]], None],
        on_serve: Callable[[list[int]], None],
    ) -> None:
        self._id = fetcher_id
        self._publish = publish  # a marker, on the hand-over channel
        self._on_cut = on_cut  # our marker passed: stop serving these shards now
        self._on_serve = on_serve  # a marker we waited for passed: serve these shards now
        self._sent: dict[str, tuple[list[int], asyncio.Future[None]]] = {}
        # shard -> (marker id, since (monotonic), the messages kept since the marker)
        self._kept: dict[int, tuple[str, float, deque[Message]]] = {}
        self._kept_bytes = 0
        self._awaiting: dict[int, tuple[str, float]] = {}  # shard -> (marker id, since)
        self.overflowed = 0  # messages not kept: past KEEP_BYTES

    @property
    def awaiting(self) -> set[int]:
        return set(self._awaiting)

    async def cut(self, shards: list[int]) -> str:
        """Give `shards` up at a marker: publish it and return its id once it passed this
        fetcher's own message loop (`on_cut` ran there). If it does not within `CUT_SECONDS`,
        `on_cut` runs here and '' is returned: no exact cut, so the next holder must not wait
        for a marker (it serves at once; the events between are lost, as after a death)."""
        marker_id = os.urandom(8).hex()
        passed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._sent[marker_id] = (shards, passed)
        try:
            await asyncio.wait_for(self._publish(encode_marker(marker_id, self._id, shards)), CUT_SECONDS)
            await asyncio.wait_for(asyncio.shield(passed), CUT_SECONDS)
        except Exception as exc:  # Redis or our subscription down: stop serving them anyway
            log.warning("hand-over of %d shard(s): the marker did not come back (%s)", len(shards), exc)
            if marker_id in self._sent:
                del self._sent[marker_id]
                self._on_cut(shards)
                return ""
        return marker_id

    def on_marker(self, data: bytes) -> None:
        """A marker in the message stream (called in order with the other messages)."""
        marker = decode_marker(data)
        if marker is None:
            log.warning("hand-over channel: dropped a message that is not a marker")
            return
        marker_id, giver, shards = marker
        if giver == self._id:
            sent = self._sent.pop(marker_id, None)
            if sent is not None:
                self._on_cut(sent[0])
                sent[1].set_result(None)
            return
        now = time.monotonic()
        ready = []
        for shard in shards:
            self._drop(shard)  # kept before this marker: served by the giver
            if self._awaiting.get(shard, ("",))[0] == marker_id:
                del self._awaiting[shard]
                ready.append(shard)
                continue
            self._kept[shard] = (marker_id, now, deque())
        if ready:
            self._on_serve(ready)

    def keep(self, shard: int, message: Message) -> None:
        """A message of a shard this fetcher does not serve: kept if it follows a marker."""
        kept = self._kept.get(shard)
        if kept is None:
            return
        if time.monotonic() - kept[1] > KEEP_SECONDS:
            self._drop(shard)
            return
        size = len(message[1])
        if self._kept_bytes + size > KEEP_BYTES:
            if not self.overflowed:
                log.warning("hand-over: more than %d MiB kept; later messages are not", KEEP_BYTES >> 20)
            self.overflowed += 1
            return
        kept[2].append(message)
        self._kept_bytes += size

    def adopt(self, shard: int, marker_id: str | None) -> list[Message] | None:
        """This fetcher just claimed `shard`, given up with `marker_id` (None: no marker, the
        last holder died or it was never held). Returns the messages to replay before serving
        it, or None: do not serve it until its marker passes (`on_serve`); what comes meanwhile
        is kept, in case the marker never does (`overdue`)."""
        kept = self._kept.get(shard)
        self._drop(shard)
        if marker_id is None:
            return []
        if kept is not None and kept[0] == marker_id:
            return list(kept[2])
        now = time.monotonic()
        self._awaiting[shard] = (marker_id, now)
        self._kept[shard] = (WAITING, now, deque())
        return None

    def forget(self, shards: list[int]) -> None:
        """No longer held: nothing to wait for."""
        for shard in shards:
            if self._awaiting.pop(shard, None) is not None:
                self._drop(shard)

    def overdue(self, *, all_awaited: bool = False) -> dict[int, list[Message]]:
        """Shards whose marker did not come within `AWAIT_SECONDS` (or every awaited one: the
        subscription was down, a marker may have passed unseen), with what was kept while
        waiting: to serve now, replaying those (some may be events the giver served before its
        marker: a duplicate beats a loss). Also drops messages kept past `KEEP_SECONDS` after
        another fetcher's marker (that fetcher took the shard)."""
        now = time.monotonic()
        late = {
            shard: list(self._kept.get(shard, ("", 0.0, deque()))[2])
            for shard, (_, since) in self._awaiting.items()
            if all_awaited or now - since > AWAIT_SECONDS
        }
        for shard in late:
            del self._awaiting[shard]
            self._drop(shard)
        if late:
            log.warning("hand-over: %d shard(s) served without their marker (not seen)", len(late))
        for shard in [s for s, (_, since, _) in self._kept.items() if now - since > KEEP_SECONDS]:
            if shard not in self._awaiting:
                self._drop(shard)
        return late

    def _drop(self, shard: int) -> None:
        kept = self._kept.pop(shard, None)
        if kept is not None:
            self._kept_bytes -= sum(len(data) for _, data in kept[2])
