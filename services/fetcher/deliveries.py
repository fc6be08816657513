"""Planning: a finished fetch (or a routed message) -> one envelope per gateway that needs it.

Pure: no Redis, no database. The driver collects a batch's envelopes in `GatewayMessages` and
publishes one message per gateway channel (a `batch` envelope when there are several), so a
gateway gets each cart once however many of its tabs want it, and a mass invalidation is a
few messages per gateway rather than one per session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from shared import codec
from shared.protocol import mask_session_id

from .cartstate import CartSnapshot
from .coalescer import SessionWork

BATCH_BYTES = 512 * 1024  # a gateway's batch message is split beyond this (Redis output buffers)


class GatewayMessages:
    """A batch's envelopes, by gateway, in the order they were planned."""

    def __init__(self) -> None:
        self._by_gateway: dict[str, list[dict[str, Any]]] = {}
        self.counts: Counter[str] = Counter()  # envelopes by metric kind

    def add(self, envelopes: dict[str, dict[str, Any]], kind: str) -> None:
        for gateway, envelope in envelopes.items():
            self._by_gateway.setdefault(gateway, []).append(envelope)
        self.counts[kind] += len(envelopes)

    def messages(self, channel_of: Callable[[str], str]) -> Iterator[tuple[str, bytes]]:
        """(channel, message) pairs: one message per gateway, split only when very large."""
        for gateway, envelopes in self._by_gateway.items():
            channel = channel_of(gateway)
            if len(envelopes) == 1:
                yield channel, codec.pack(envelopes[0])
                continue
            items: list[dict[str, Any]] = []
            size = 0
            for envelope in envelopes:
                items.append(envelope)
                size += len(envelope.get("applications") or "") + 200
                if size >= BATCH_BYTES:
                    yield channel, codec.pack({"kind": codec.BATCH, "items": items})
                    items, size = [], 0
            if items:
                yield channel, codec.pack({"kind": codec.BATCH, "items": items})


def plan_cart_deliveries(
    work: SessionWork, session_key: str, owners: Iterable[str], snapshot: CartSnapshot
) -> dict[str, dict[str, Any]]:
    """Return {gateway_id: cart envelope}. `owners` matter only for a trigger (`push_all`)."""
    push_to = set(owners) if work.push_all else set()
    push_to |= work.refresh_gateways
    tokens: dict[str, list[list[Any]]] = {}
    for gateway, token, kind in work.requests:
        tokens.setdefault(gateway, []).append([token, kind])
    envelopes = {}
    for gateway in push_to | tokens.keys():
        envelope: dict[str, Any] = {
            "kind": codec.CART,
            "key": session_key,
            "sid": mask_session_id(work.session_id),
            "seq": snapshot.seq,
            "fetched_at": snapshot.fetched_at,
            "ok": snapshot.error is None,
            "count": snapshot.count,
            "all": gateway in push_to,
            "tokens": tokens.get(gateway, []),
            "received_at": work.received_at,
        }
        if snapshot.error is None:
            envelope["applications"] = snapshot.applications_json
        else:
            envelope["message"] = snapshot.error
        envelopes[gateway] = envelope
    return envelopes


def plan_frame_deliveries(
    session_key: str, owners: Iterable[str], frame: str, received_at: float | None
) -> dict[str, dict[str, Any]]:
    envelope = {"kind": codec.FRAME, "key": session_key, "frame": frame, "received_at": received_at}
    return {gateway: envelope for gateway in owners}


def plan_room_deliveries(
    room: str, owners: Iterable[str], frame: str, received_at: float | None
) -> dict[str, dict[str, Any]]:
    envelope = {"kind": codec.FRAME, "room": room, "frame": frame, "received_at": received_at}
    return {gateway: envelope for gateway in owners}
