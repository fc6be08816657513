"""The JSON texts the gateway writes to tabs: its own messages stamped, carts rendered once per push.

The fetcher ships the cart's `applications` as JSON text; `render_cart` wraps it in the
`partial_applications_response` object of PROTOCOL.md §5.2 without parsing it (spliced, not
re-encoded), and one rendered text is shared by every tab a push goes to.
"""

from __future__ import annotations

from typing import Any

from shared.codec import dumps
from shared.envelopes import Cart
from shared.protocol import now_iso

_SLOT = "\x00applications\x00"
_SLOT_JSON = dumps(_SLOT)


def stamp(message: dict[str, Any]) -> str:
    """JSON text of a server message, with `timestamp` added when missing (PROTOCOL.md §1)."""
    if "timestamp" not in message:
        message = {**message, "timestamp": now_iso()}
    return dumps(message)


def render_cart(cart: Cart, *, push: bool, request_id: Any = None, has_request_id: bool = False) -> str:
    """A `partial_applications_response` message from a cart envelope.

    `push`: a server push (`source: "server_push"`, no requestId). Otherwise a reply to
    `get_partial_applications`, with the top-level `requestId` when the client sent one.
    """
    data: dict[str, Any]
    if cart.applications is not None:
        data = {
            "error": False,
            "status": "success",
            "applications": _SLOT,
            "count": cart.count,
            "sessionId": cart.masked_session_id,
        }
    else:
        data = {"error": True, "status": "error", "message": cart.error, "sessionId": cart.masked_session_id}
    if push:
        data["source"] = "server_push"
    data["timestamp"] = cart.fetched_at
    data["seq"] = cart.seq
    data["diff"] = None
    message: dict[str, Any] = {"type": "partial_applications_response", "data": data}
    if has_request_id:
        message["requestId"] = request_id
    message["timestamp"] = cart.fetched_at
    text = dumps(message)
    if cart.applications is not None:
        # The slot is the first occurrence: `data` precedes every client-supplied field.
        text = text.replace(_SLOT_JSON, cart.applications, 1)
    return text
