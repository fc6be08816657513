"""Every message between fetchers and gateways: one type each, encoded and checked here only.

  fetcher -> one gateway's channel   `Cart`, `Event`, or several of them in one message
                                     (one publish per gateway per fetch batch)
  gateway -> another gateway         `Event` (a tab's session or room message, relayed)
  fetcher -> every gateway           `Resync` (these shards changed hands: ask again), and
                                     `Event`s for every tab (broadcasts)
  gateway -> the fetchers            `CartRequests` (tabs that joined or asked, batched) and
                                     `Refresh` (this gateway may have missed pushes)

Both sides use these types; neither builds or reads a map by hand. Decoding checks every field
before anything acts on a message: a cart rejected for a missing field had already raised a
tab's cart `seq` (here to 10^18), so the tab ignored every later push. A bad item of a batch
costs only itself.

On the wire each envelope is a msgpack map with a `kind`. The field names are the previous
release's (`frame` for an event and its text, `key` for a session hash), kept so that a
rolling deploy mixing the two releases loses nothing; `WIRE` below is the whole mapping.
A batch is packed from its items' own bytes (each item encoded once), so that its size is
known exactly before it is published: Redis drops a subscriber whose output buffer passes
32 MiB (`client-output-buffer-limit pubsub`), and every message on its channel with it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgpack

from shared.protocol import is_valid_session_id

# Request kinds: a tab asked (`GET`: reply to that tab with its requestId) or joined (`JOIN`:
# send it the cart as a push).
GET: Final = "get"
JOIN: Final = "join"

# The `kind` of each envelope on the wire.
CART: Final = "cart"
EVENT: Final = "frame"
RESYNC: Final = "resync"
BATCH: Final = "batch"
REQUESTS: Final = "requests"
REFRESH: Final = "refresh"
WIRE: Final = {
    "Cart": "cart {key: session hash, sid, seq, fetched_at, ok, count, applications | message, all, tokens, received_at}",
    "Event": "frame {frame: text, key: session hash | room | broadcast: true, received_at}",
    "Resync": "resync {shards, of}",
    "CartRequests": "requests {gateway, items: [[session id, token, get|join]]}; get / join singly (older gateways)",
    "Refresh": "refresh {gateway, sids}",
    "several to one gateway": "batch {items: [...]}",
}
# A message on a gateway's channel stays below this (Redis' pub/sub output buffer default is
# 32 MiB; a batch of large events once reached 36 MiB and the gateway was disconnected).
MAX_MESSAGE_BYTES: Final = 4 * 1024 * 1024
# Beyond this a batch is split (many small messages are cheaper to fan out than one huge one).
BATCH_BYTES: Final = 512 * 1024


class EnvelopeError(ValueError):
    """A message that is not an envelope of this kind, or lacks one of its fields."""


@dataclass(slots=True)
class Cart:
    """A session's cart as a fetcher read it (or kept it), with its `seq`, for one gateway."""

    session_hash: str
    masked_session_id: str  # the `sessionId` tabs are shown
    seq: int
    fetched_at: str  # ISO time of the read
    applications: str | None  # the cart's JSON array text, spliced into frames unparsed; None: an error
    count: int = 0
    error: str | None = None  # the message shown instead of a cart the database could not give
    push: bool = False  # push to every tab of the session on that gateway
    tokens: list[tuple[int, str]] = field(default_factory=list)  # requests it answers: (token, GET|JOIN)
    received_at: float | None = None  # the trigger's arrival at the fetcher (latency histogram)

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(slots=True)
class Event:
    """A message for tabs that is not a cart (a notification, a room message, a relay, a
    broadcast), already rendered as JSON text, for the tabs of a session, a room, or all."""

    text: str
    session_hash: str | None = None
    room: str | None = None
    broadcast: bool = False
    received_at: float | None = None


@dataclass(slots=True)
class Resync:
    """These fetcher shards (of `of`) changed hands: gateways ask again for their sessions."""

    shards: list[int]
    of: int


@dataclass(slots=True)
class CartRequest:
    session_id: str
    token: int
    kind: str  # GET or JOIN


@dataclass(slots=True)
class CartRequests:
    gateway: str
    items: list[CartRequest]


@dataclass(slots=True)
class Refresh:
    """`gateway` may have missed pushes: push these sessions' current carts to it."""

    gateway: str
    session_ids: list[str]


ToGateway = Cart | Event | Resync
ToFetchers = CartRequests | Refresh


# -- encoding ------------------------------------------------------------------------------


def _pack(value: Any) -> bytes:
    data: bytes = msgpack.packb(value, use_bin_type=True)
    return data


def _wire(envelope: ToGateway | ToFetchers) -> dict[str, Any]:
    if isinstance(envelope, Cart):
        wire: dict[str, Any] = {
            "kind": CART,
            "key": envelope.session_hash,
            "sid": envelope.masked_session_id,
            "seq": envelope.seq,
            "fetched_at": envelope.fetched_at,
            "ok": envelope.error is None,
            "count": envelope.count,
            "all": envelope.push,
            "tokens": [list(token) for token in envelope.tokens],
            "received_at": envelope.received_at,
        }
        if envelope.error is None:
            wire["applications"] = envelope.applications
        else:
            wire["message"] = envelope.error
        return wire
    if isinstance(envelope, Event):
        wire = {"kind": EVENT, "frame": envelope.text, "received_at": envelope.received_at}
        if envelope.broadcast:
            wire["broadcast"] = True
        elif envelope.room is not None:
            wire["room"] = envelope.room
        else:
            wire["key"] = envelope.session_hash
        return wire
    if isinstance(envelope, Resync):
        return {"kind": RESYNC, "shards": envelope.shards, "of": envelope.of}
    if isinstance(envelope, CartRequests):
        items = [[item.session_id, item.token, item.kind] for item in envelope.items]
        return {"kind": REQUESTS, "gateway": envelope.gateway, "items": items}
    return {"kind": REFRESH, "gateway": envelope.gateway, "sids": envelope.session_ids}


def encode(envelope: ToGateway | ToFetchers) -> bytes:
    """One envelope as one message."""
    return _pack(_wire(envelope))


def encode_batches(envelopes: Sequence[Cart | Event]) -> Iterator[bytes]:
    """The messages that carry `envelopes` to one gateway, in order: one message while they fit
    in `BATCH_BYTES`, more beyond. Each envelope is encoded once; a single envelope is never
    wrapped."""
    if len(envelopes) == 1:
        yield encode(envelopes[0])
        return
    items: list[bytes] = []
    size = 0
    for envelope in envelopes:
        packed = encode(envelope)
        if items and size + len(packed) > BATCH_BYTES:
            yield _batch(items)
            items, size = [], 0
        items.append(packed)
        size += len(packed)
    if items:
        yield _batch(items) if len(items) > 1 else items[0]


_BATCH_HEAD = msgpack.packb("kind") + msgpack.packb(BATCH) + msgpack.packb("items")


def _batch(items: list[bytes]) -> bytes:
    """`{"kind": "batch", "items": [...]}` from items already packed (msgpack concatenates)."""
    packer = msgpack.Packer()
    head: bytes = packer.pack_map_header(2) + _BATCH_HEAD + packer.pack_array_header(len(items))
    return head + b"".join(items)


# -- decoding ------------------------------------------------------------------------------


def _unpack(data: bytes) -> dict[str, Any]:
    try:
        wire = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise EnvelopeError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(wire, dict) or not isinstance(wire.get("kind"), str):
        raise EnvelopeError("not a map with a kind")
    return wire


def _field(wire: dict[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    value = wire.get(name)
    allowed = kinds if isinstance(kinds, tuple) else (kinds,)
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        raise EnvelopeError(f"{str(wire.get('kind'))[:20]}: field {name!r} missing or not {kinds}")
    return value


_HEX64 = frozenset("0123456789abcdef")


def _session_hash(wire: dict[str, Any]) -> str:
    value: str = _field(wire, "key", str)
    if len(value) != 64 or not set(value) <= _HEX64:
        raise EnvelopeError(f"{wire['kind']}: key is not a session hash")
    return value


def _json_text(text: str, opener: str, closer: str, what: str) -> str:
    # Spliced into frames unparsed (the point of shipping JSON text); a cheap shape check keeps
    # a truncated or foreign payload from reaching browsers as a broken frame.
    stripped = text.strip()
    if not (stripped.startswith(opener) and stripped.endswith(closer)):
        raise EnvelopeError(f"{what} is not a JSON {'array' if opener == '[' else 'object'}")
    return text


def _received_at(wire: dict[str, Any]) -> float | None:
    value = wire.get("received_at")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
        raise EnvelopeError(f"{wire['kind']}: received_at is not a number")
    return value


def _cart(wire: dict[str, Any]) -> Cart:
    session_hash = _session_hash(wire)
    seq = _field(wire, "seq", int)
    if seq <= 0:
        raise EnvelopeError("cart: seq must be positive")
    tokens = []
    for token in _field(wire, "tokens", list):
        if not (
            isinstance(token, list)
            and len(token) == 2
            and isinstance(token[0], int)
            and not isinstance(token[0], bool)
            and token[1] in (GET, JOIN)
        ):
            raise EnvelopeError("cart: a token is not [int, get|join]")
        tokens.append((token[0], token[1]))
    ok = _field(wire, "ok", bool)
    return Cart(
        session_hash,
        _field(wire, "sid", str),
        seq,
        _field(wire, "fetched_at", str),
        _json_text(_field(wire, "applications", str), "[", "]", "cart: applications") if ok else None,
        count=_field(wire, "count", int) if ok else 0,
        error=None if ok else _field(wire, "message", str),
        push=_field(wire, "all", bool),
        tokens=tokens,
        received_at=_received_at(wire),
    )


def _event(wire: dict[str, Any]) -> Event:
    text = _json_text(_field(wire, "frame", str), "{", "}", "event")
    received_at = _received_at(wire)
    if wire.get("broadcast") is True:
        return Event(text, broadcast=True, received_at=received_at)
    if "room" in wire:
        return Event(text, room=_field(wire, "room", str), received_at=received_at)
    return Event(text, session_hash=_session_hash(wire), received_at=received_at)


def _resync(wire: dict[str, Any]) -> Resync:
    shards, of = _field(wire, "shards", list), _field(wire, "of", int)
    if of <= 0 or not all(isinstance(n, int) and not isinstance(n, bool) for n in shards):
        raise EnvelopeError("resync: shards are not shard numbers")
    return Resync(shards, of)


def _to_gateway(wire: dict[str, Any]) -> ToGateway:
    kind = wire["kind"]
    if kind == CART:
        return _cart(wire)
    if kind == EVENT:
        return _event(wire)
    if kind == RESYNC:
        return _resync(wire)
    raise EnvelopeError(f"unknown kind {str(kind)[:40]!r}")


def decode_for_gateway(data: bytes) -> list[ToGateway | EnvelopeError]:
    """The envelopes of one message on a gateway's channel, every field checked: one envelope,
    or each item of a batch. An invalid item is returned as its EnvelopeError in its place, so
    that it costs only itself; a message that is not an envelope at all raises EnvelopeError."""
    wire = _unpack(data)
    if wire["kind"] != BATCH:
        return [_to_gateway(wire)]
    checked: list[ToGateway | EnvelopeError] = []
    for item in _field(wire, "items", list):
        try:
            if not isinstance(item, dict) or item.get("kind") not in (CART, EVENT):
                raise EnvelopeError("batch: an item is not a cart or an event")
            checked.append(_to_gateway(item))
        except EnvelopeError as exc:
            checked.append(exc)
    return checked


def _request(item: Any) -> CartRequest:
    if not (
        isinstance(item, list)
        and len(item) == 3
        and is_valid_session_id(item[0])
        and isinstance(item[1], int)
        and not isinstance(item[1], bool)
        and item[2] in (GET, JOIN)
    ):
        raise EnvelopeError("requests: an item is not [session id, token, get|join]")
    return CartRequest(item[0], item[1], item[2])


def decode_for_fetchers(data: bytes) -> tuple[ToFetchers, list[EnvelopeError]]:
    """A message on the fetchers' requests channel, and the errors of the items it dropped (a
    bad item costs only itself). Raises EnvelopeError when the message itself is unusable."""
    wire = _unpack(data)
    kind = wire["kind"]
    gateway = _field(wire, "gateway", str)
    errors: list[EnvelopeError] = []
    if kind == REQUESTS:
        items = []
        for item in _field(wire, "items", list):
            try:
                items.append(_request(item))
            except EnvelopeError as exc:
                errors.append(exc)
        return CartRequests(gateway, items), errors
    if kind in (GET, JOIN):  # one request alone, as gateways of an older release sent them
        return CartRequests(gateway, [_request([wire.get("sid"), wire.get("token"), kind])]), errors
    if kind == REFRESH:
        sids: list[str] = []
        for sid in _field(wire, "sids", list):
            if is_valid_session_id(sid):
                sids.append(sid)
            else:
                errors.append(EnvelopeError("refresh: an item is not a session id"))
        return Refresh(gateway, sids), errors
    raise EnvelopeError(f"unknown kind {str(kind)[:40]!r}")
