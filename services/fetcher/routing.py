"""Routing: a finished fetch (or an event) -> one envelope per gateway that needs it.

Pure: no Redis, no database. The driver collects a batch's envelopes in `GatewayMessages` and
publishes one message per gateway channel (a batch when there are several,
`shared.envelopes.encode_batches`), so a gateway gets each cart once however many of its tabs
want it, and a mass invalidation is a few messages per gateway rather than one per session.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable, Iterator

from shared.envelopes import Cart, Event, encode_batches
from shared.protocol import mask_session_id

from .cartstate import CartSnapshot
from .coalescer import SessionWork


class GatewayMessages:
    """A batch's envelopes, by gateway, in the order they were routed."""

    def __init__(self) -> None:
        self._by_gateway: dict[str, list[Cart | Event]] = {}
        self.counts: Counter[str] = Counter()  # envelopes by metric kind

    def add(self, envelopes: dict[str, Cart] | dict[str, Event], kind: str) -> None:
        for gateway, envelope in envelopes.items():
            self._by_gateway.setdefault(gateway, []).append(envelope)
        self.counts[kind] += len(envelopes)

    def messages(self, channel_of: Callable[[str], str]) -> Iterator[tuple[str, bytes]]:
        """(channel, message) pairs: one message per gateway, split only when large."""
        for gateway, envelopes in self._by_gateway.items():
            channel = channel_of(gateway)
            for message in encode_batches(envelopes):
                yield channel, message


def route_cart(
    work: SessionWork, session_hash: str, owners: Iterable[str], snapshot: CartSnapshot
) -> dict[str, Cart]:
    """{gateway id: cart envelope}. `owners` matter only for a trigger (`push_all`)."""
    push_to = set(owners) if work.push_all else set()
    push_to |= work.refresh_gateways
    tokens: dict[str, list[tuple[int, str]]] = {}
    for gateway, token, kind in work.requests:
        tokens.setdefault(gateway, []).append((token, kind))
    masked = mask_session_id(work.session_id)
    return {
        gateway: Cart(
            session_hash,
            masked,
            snapshot.seq,
            snapshot.fetched_at,
            snapshot.applications_json if snapshot.error is None else None,
            count=snapshot.count,
            error=snapshot.error,
            push=gateway in push_to,
            tokens=tokens.get(gateway, []),
            received_at=work.received_at,
        )
        for gateway in push_to | tokens.keys()
    }


def route_session_event(
    session_hash: str, owners: Iterable[str], text: str, received_at: float | None
) -> dict[str, Event]:
    event = Event(text, session_hash=session_hash, received_at=received_at)
    return {gateway: event for gateway in owners}


def route_room_event(
    room: str, owners: Iterable[str], text: str, received_at: float | None
) -> dict[str, Event]:
    event = Event(text, room=room, received_at=received_at)
    return {gateway: event for gateway in owners}
