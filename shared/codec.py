"""msgpack envelopes between the services, and the JSON text sent to browsers.

Envelopes are maps with a `kind`. Carts travel with their `applications` already encoded as
JSON text (bytes), so a gateway splices them into frames without decoding or re-encoding.

  fetcher -> gateway channel      cart, frame
  gateway -> gateway channel      frame (a tab's session_message to the other tabs)
  gateway -> fetcher requests     get (a tab asks), join (a tab joined), refresh (gateway resync)
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
    """Compact JSON as sent to browsers (non-ASCII kept, as PHP's JSON_UNESCAPED_UNICODE)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
