"""The wire contract with browsers and the PHP backend (PROTOCOL.md): names, ids, close codes."""

from __future__ import annotations

import hashlib
import re
from datetime import UTC, datetime
from enum import IntEnum
from typing import Any, Final

_SESSION_ID = re.compile(r"[A-Za-z0-9,-]{1,128}")

DEFAULT_COOKIE_NAMES: Final = ("bookingfrontendsession", "sessionphpgwsessid", "PHPSESSID")


class CloseCode(IntEnum):
    """Every close code the gateway sends, and whether the client should reconnect.

    The browser client reconnects with back-off on any close it did not ask for; the comment
    says what a well-behaved client does.
    """

    NORMAL = 1000  # the client asked to close: do not reconnect
    GOING_AWAY = 1001  # gateway draining or shutting down: reconnect (after retryAfterMs if sent)
    UNSUPPORTED_DATA = 1003  # binary frame: a client bug; reconnecting repeats it
    POLICY_VIOLATION = 1008  # too many bad messages (RATE_LIMITED): reconnect with back-off
    MESSAGE_TOO_BIG = 1009  # frame over the size limit (sent by the WebSocket layer)
    INTERNAL_ERROR = 1011  # unexpected server error: reconnect with back-off
    TRY_AGAIN_LATER = 1013  # slow consumer, its outbox overflowed: reconnect with back-off


class ErrorCode:
    """`code` values of `{"type":"error"}` replies (PROTOCOL.md §2, §3)."""

    NO_SESSION = "NO_SESSION"
    INVALID_SESSION_ID = "INVALID_SESSION_ID"
    INVALID_JSON = "INVALID_JSON"
    INVALID_MESSAGE = "INVALID_MESSAGE"
    UNSUPPORTED_MESSAGE_TYPE = "UNSUPPORTED_MESSAGE_TYPE"
    RATE_LIMITED = "RATE_LIMITED"
    ROOM_ACCESS_DENIED = "ROOM_ACCESS_DENIED"


# What a tab may send and be served (PROTOCOL.md §3; the gateway's handlers are these, a test
# keeps them equal). The request types it is answered only with an error are
# `services/gateway/tab_protocol.UNSERVED_REQUESTS`.
CLIENT_MESSAGE_TYPES: Final = frozenset(
    {
        "ping",
        "pong",
        "update_session",
        "update_user_info",
        "get_partial_applications",
        "subscribe",
        "unsubscribe",
        "session_message",
        "room_ping_response",
        "room_message",
    }
)
# Rate budgets are named by client message type, or by one of these (`services/gateway/budgets.py`).
BUDGET_ANY: Final = "any"  # every message
BUDGET_NEW_SESSION: Final = "new_session"  # update_session to an id other than the current one
BUDGET_NOT_IMPLEMENTED: Final = "not_implemented"  # the unserved request types, together
BUDGET_CONNECT: Final = "connect"  # a Socket.IO CONNECT again on the same Engine.IO session
BUDGET_NAMES: Final = CLIENT_MESSAGE_TYPES | {
    BUDGET_ANY,
    BUDGET_NEW_SESSION,
    BUDGET_NOT_IMPLEMENTED,
    BUDGET_CONNECT,
}


def is_valid_session_id(value: object) -> bool:
    """PHP's session id charset: `[A-Za-z0-9,-]`, 1 to 128 characters."""
    return isinstance(value, str) and _SESSION_ID.fullmatch(value) is not None


def mask_session_id(session_id: str) -> str:
    """The only form of a session id that may be logged or shown: first 8 chars + `...`."""
    return session_id[:8] + "..."


def session_hash(session_id: str) -> str:
    """Internal routing key of a session (Redis keys, envelopes): full SHA-256 hex.

    The full digest (not the 16-char room id) so that two sessions can never share a route.
    """
    return hashlib.sha256(session_id.encode()).hexdigest()


def session_room_id(session_id: str) -> str:
    """The session room id shown to clients: `session_` + 16 hex chars of SHA-256."""
    return "session_" + session_hash(session_id)[:16]


_ROOM_PART = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


def is_valid_room_part(value: object) -> bool:
    """An entity type/id or user type/identifier usable in a room name (and a Redis key)."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    return isinstance(value, str) and _ROOM_PART.fullmatch(value) is not None


def entity_room_id(entity_type: object, entity_id: object) -> str:
    return f"entity_{entity_type}_{entity_id}"


def user_room_id(user_type: object, identifier: object) -> str:
    return f"user_{user_type}_{identifier}"


def room_route(room_id: str) -> str:
    """The ownership route of an entity or user room (see `Keys.route_owners`)."""
    return "room:" + room_id


def shard_of(route: str, shards: int) -> int:
    """Which fetcher shard serves a route (a session hash, or a `room:` route). Every gateway
    and fetcher must agree."""
    digest = route if not route.startswith("room:") else hashlib.sha256(route.encode()).hexdigest()
    return int(digest[:8], 16) % shards


BROADCAST_ROUTE = "room:*broadcast"  # only picks the one fetcher that publishes broadcasts


def now_iso() -> str:
    """ISO-8601 UTC timestamp as PHP's `date('c')` prints it: `2025-05-12T11:54:20+00:00`."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def error_message(code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"type": "error", "code": code, "message": message, **extra}


# Types only the server sends, with protocol meaning for the client: a payload routed from Redis
# to tabs may never carry one (PROTOCOL.md §2 lists them).
RESERVED_TYPES: Final = frozenset(
    {
        "partial_applications_response",
        "reconnect_required",
        "connection_success",
        "session_id_required",
        "session_update_confirmation",
        "room_joined",
        "subscription_confirmation",
        "user_info_update_confirmation",
        "pong",
        "server_ping",
        "error",
    }
)
_SESSION_FIELDS: Final = ("sessionId", "session_id")


def mask_session_fields(value: Any) -> Any:
    """Mask every session id field (`sessionId`, `session_id`) of a payload routed from Redis
    to tabs, however deeply nested (PROTOCOL.md §2). Modifies dicts in place; returns `value`."""
    if isinstance(value, dict):
        for name, item in value.items():
            if name in _SESSION_FIELDS and isinstance(item, str):
                if not item.endswith("..."):
                    value[name] = mask_session_id(item)
            else:
                mask_session_fields(item)
    elif isinstance(value, list):
        for item in value:
            mask_session_fields(item)
    return value
