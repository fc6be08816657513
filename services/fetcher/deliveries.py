"""Planning: a finished fetch (or a routed message) -> one envelope per gateway that needs it.

Pure: no Redis, no database. The driver publishes what this returns, one envelope per gateway
channel, so a gateway gets each cart once however many of its tabs want it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from shared import codec
from shared.protocol import mask_session_id

from .coalescer import SessionWork


@dataclass(frozen=True, slots=True)
class CartSnapshot:
    seq: int
    fetched_at: str  # ISO timestamp of the read
    applications_json: str | None  # JSON array text; None when the read failed
    count: int = 0
    error: str | None = None


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
