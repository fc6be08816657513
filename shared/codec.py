"""msgpack envelopes between the services, and the JSON text sent to browsers.

Envelopes are maps with a `kind`. Carts travel with their `applications` already encoded as
JSON text (bytes), so a gateway splices them into frames without decoding or re-encoding.

  fetcher -> gateway channel      cart, frame, or a batch of them (one publish per gateway
                                  per fetch batch: a mass invalidation is a few messages)
  gateway -> gateway channel      frame (a tab's session_message to the other tabs)
  gateway -> fetcher requests     requests (tabs that joined or asked, batched: [sid, token,
                                  get|join] items), refresh (gateway resync); get and join
                                  singly are still accepted from gateways of an older release
  fetcher -> all gateways         resync (these shards changed hands: ask again)
"""

from __future__ import annotations

import json
from typing import Any

import msgpack

CART = "cart"
FRAME = "frame"
GET = "get"  # a tab asked: reply to that socket with its requestId
JOIN = "join"  # a tab joined the session: send it the cart as a push
REFRESH = "refresh"
RESYNC = "resync"
REQUESTS = "requests"  # a gateway's batch of get/join requests
BATCH = "batch"  # a fetcher's batch of cart and frame envelopes for one gateway


class CodecError(ValueError):
    """An envelope that cannot be decoded or lacks its fields."""


def pack(envelope: dict[str, Any]) -> bytes:
    data: bytes = msgpack.packb(envelope, use_bin_type=True)
    return data


def unpack(data: bytes) -> dict[str, Any]:
    try:
        envelope = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types
        raise CodecError(f"not msgpack: {exc.__class__.__name__}") from None
    if not isinstance(envelope, dict) or not isinstance(envelope.get("kind"), str):
        raise CodecError("envelope is not a map with a kind")
    return envelope


def dumps(obj: Any) -> str:
    """Compact RFC 8259 JSON as sent to browsers (non-ASCII kept, as PHP's
    JSON_UNESCAPED_UNICODE). Raises ValueError for NaN/Infinity rather than emit text that a
    browser's `JSON.parse` rejects."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(raw: str | bytes) -> Any:
    """Parse RFC 8259 JSON only: what we parse we may echo or relay, and a browser must be
    able to parse it again.

    Python's `json` accepts `NaN`/`Infinity` and `\\ud800`-style lone surrogates (and decodes
    bytes with `surrogatepass`); any of them in a frame sent back would make the browser's
    `JSON.parse` throw, or make the UTF-8 encoding of the frame fail in the writer. Raises
    ValueError for all of them.
    """
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw  # strict: no surrogates
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    if "\\u" in text:
        # Only an escape can produce a lone surrogate; prove the value re-encodes as UTF-8.
        dumps(value).encode("utf-8")
    return value


# -- what a gateway accepts on its channels ------------------------------------------------
# Every field is checked before the gateway acts on an envelope: a rejected envelope must not
# change any state (a cart rejected for a missing field had already raised a tab's cart seq,
# so the tab ignored every later push).

_HEX64 = frozenset("0123456789abcdef")


def _field(envelope: dict[str, Any], name: str, kinds: type | tuple[type, ...]) -> Any:
    value = envelope.get(name)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _as_tuple(kinds)):
        raise CodecError(f"{envelope.get('kind')}: field {name!r} missing or not {kinds}")
    return value


def _as_tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _check_key(envelope: dict[str, Any]) -> None:
    key = _field(envelope, "key", str)
    if len(key) != 64 or not set(key) <= _HEX64:
        raise CodecError(f"{envelope['kind']}: key is not a session key")


def _check_json_text(text: str, opener: str, closer: str, what: str) -> None:
    # Spliced into frames unparsed (the point of shipping JSON text); a cheap shape check keeps
    # a truncated or foreign payload from reaching browsers as a broken frame.
    stripped = text.strip()
    if not (stripped.startswith(opener) and stripped.endswith(closer)):
        raise CodecError(f"{what} is not a JSON {'array' if opener == '[' else 'object'}")


def decode_deliveries(data: bytes) -> list[dict[str, Any] | CodecError]:
    """The envelopes of one message on a gateway's channel, every field checked: a single
    envelope, or each item of a batch. An invalid item is returned as its CodecError in its
    place, so that it costs only itself; a message that is not an envelope raises CodecError."""
    envelope = unpack(data)
    if envelope["kind"] != BATCH:
        return [check_delivery(envelope)]
    items = _field(envelope, "items", list)
    checked: list[dict[str, Any] | CodecError] = []
    for item in items:
        try:
            if not isinstance(item, dict) or item.get("kind") == BATCH:
                raise CodecError("batch: an item is not a cart or frame envelope")
            checked.append(check_delivery(item))
        except CodecError as exc:
            checked.append(exc)
    return checked


def decode_delivery(data: bytes) -> dict[str, Any]:
    """A fetcher's or gateway's envelope for this gateway, every field checked (CodecError)."""
    return check_delivery(unpack(data))


def check_delivery(envelope: dict[str, Any]) -> dict[str, Any]:
    kind = envelope.get("kind")
    received_at = envelope.get("received_at")
    if received_at is not None and not isinstance(received_at, int | float):
        raise CodecError(f"{kind}: received_at is not a number")
    if kind == CART:
        _check_key(envelope)
        if _field(envelope, "seq", int) <= 0:
            raise CodecError("cart: seq must be positive")
        _field(envelope, "sid", str)
        _field(envelope, "fetched_at", str)
        _field(envelope, "all", bool)
        if _field(envelope, "ok", bool):
            _field(envelope, "count", int)
            _check_json_text(_field(envelope, "applications", str), "[", "]", "cart: applications")
        else:
            _field(envelope, "message", str)
        for token in _field(envelope, "tokens", list):
            if not (
                isinstance(token, list)
                and len(token) == 2
                and isinstance(token[0], int)
                and token[1] in (GET, JOIN)
            ):
                raise CodecError("cart: a token is not [int, get|join]")
    elif kind == FRAME:
        _check_json_text(_field(envelope, "frame", str), "{", "}", "frame")
        if envelope.get("broadcast") is True:
            pass
        elif "room" in envelope:
            _field(envelope, "room", str)
        else:
            _check_key(envelope)
    elif kind == RESYNC:
        shards, of = _field(envelope, "shards", list), _field(envelope, "of", int)
        if of <= 0 or not all(isinstance(n, int) and not isinstance(n, bool) for n in shards):
            raise CodecError("resync: shards are not shard numbers")
    else:
        raise CodecError(f"unknown kind {str(kind)[:40]!r}")
    return envelope
