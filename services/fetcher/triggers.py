"""Parsing what the PHP backend publishes on `session_messages`, `notifications` and
`room_messages` (PROTOCOL.md §5.1, §6).

Pure: bytes in, a `Trigger` out, or `InvalidInput` with a reason that is safe to log and to use
as a metric label (the session id in it is masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from shared.codec import dumps, loads_strict
from shared.protocol import (
    BROADCAST_ROUTE,
    RESERVED_TYPES,
    entity_room_id,
    is_valid_room_part,
    is_valid_session_id,
    mask_session_fields,
    mask_session_id,
    now_iso,
    room_route,
    session_hash,
    user_room_id,
)

UPDATE_PARTIAL_APPLICATIONS: Final = "update_partial_applications"
SESSION_TARGETED: Final = "session_targeted"
REFRESH_BOOKINGUSER: Final = "refresh_bookinguser"
KNOWN_TYPES: Final = (UPDATE_PARTIAL_APPLICATIONS, SESSION_TARGETED, REFRESH_BOOKINGUSER)


class InvalidInput(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason  # a fixed token: too_large, not_json, not_object, ...


@dataclass(frozen=True, slots=True)
class Trigger:
    type: str
    session_id: str
    event: str | None = None  # for the types that are events: the JSON text for the tabs


def _load_object(raw: bytes | str, max_bytes: int) -> dict[str, Any]:
    if len(raw) > max_bytes:
        raise InvalidInput("too_large", f"{len(raw)} bytes")
    try:
        payload = loads_strict(raw)  # RFC 8259 only: NaN or a lone surrogate would reach browsers
    except ValueError:
        raise InvalidInput("not_json") from None
    if not isinstance(payload, dict):
        raise InvalidInput("not_object")
    return payload


def _for_tabs(message: dict[str, Any]) -> str:
    """The JSON text of an event for tabs: never one that impersonates the server's own
    messages (a `partial_applications_response` would bypass `seq`, a `reconnect_required`
    would disconnect every tab), and no full session id anywhere in it."""
    if message.get("type") in RESERVED_TYPES:
        raise InvalidInput("reserved_type", str(message.get("type")))
    message.setdefault("timestamp", now_iso())
    return dumps(mask_session_fields(message))


def parse_session_message(raw: bytes | str, max_bytes: int) -> Trigger:
    payload = _load_object(raw, max_bytes)
    kind = payload.get("type")
    if kind not in KNOWN_TYPES:
        raise InvalidInput("unknown_type", repr(kind)[:40])
    session_id = payload.get("sessionId")
    if not is_valid_session_id(session_id):
        shown = mask_session_id(session_id) if isinstance(session_id, str) else type(session_id).__name__
        raise InvalidInput("bad_session_id", shown)
    assert isinstance(session_id, str)

    if kind == UPDATE_PARTIAL_APPLICATIONS:
        return Trigger(kind, session_id)
    if kind == SESSION_TARGETED:
        data = payload.get("data")
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            raise InvalidInput("bad_data", f"session {mask_session_id(session_id)}")
        return Trigger(kind, session_id, _for_tabs(dict(data)))
    message = payload.get("message")
    refresh: dict[str, Any] = {
        "type": REFRESH_BOOKINGUSER,
        "message": message if isinstance(message, str) else "Booking user information changed",
        "action": "refresh",
        "timestamp": payload.get("timestamp") if isinstance(payload.get("timestamp"), str) else now_iso(),
    }
    return Trigger(kind, session_id, dumps(refresh))


@dataclass(frozen=True, slots=True)
class Routed:
    """An event for the tabs of a route: a session hash, a `room:` route, or the broadcast."""

    route: str
    text: str
    session_id: str | None = None  # set for session routes (the fetcher needs the id)


# notifications `target` -> the two payload fields that name its room
_ROOM_TARGETS: Final = {"entity": ("entityType", "entityId"), "user": ("userType", "identifier")}


def parse_notification(raw: bytes | str, max_bytes: int) -> Routed:
    """A `notifications` payload (PROTOCOL.md §6) -> where it goes and the event's text."""
    payload = _load_object(raw, max_bytes)
    target = payload.get("target")
    if target == "session":
        session_id = payload.get("sessionId")
        if not is_valid_session_id(session_id):
            raise InvalidInput("bad_session_id")
        assert isinstance(session_id, str)
        if not isinstance(payload.get("type"), str):
            payload["type"] = "notification"
        return Routed(session_hash(session_id), _for_tabs(payload), session_id)
    room_parts = _ROOM_TARGETS.get(target) if isinstance(target, str) else None
    if room_parts is not None:
        first, second = payload.get(room_parts[0]), payload.get(room_parts[1])
        if not (is_valid_room_part(first) and is_valid_room_part(second)):
            raise InvalidInput("bad_room")
        if target == "entity":
            room = entity_room_id(first, second)
            payload.setdefault("type", "entity_event")
            payload.setdefault("roomId", room)
        else:
            room = user_room_id(first, second)
            payload.setdefault("type", "notification")
        return Routed(room_route(room), _for_tabs(payload))
    if not isinstance(payload.get("type"), str):
        raise InvalidInput("unknown_type")
    payload["source"] = "redis"
    payload["received_at"] = now_iso()
    return Routed(BROADCAST_ROUTE, _for_tabs(payload))


def parse_room_message(raw: bytes | str, max_bytes: int) -> Routed:
    """A `room_messages` payload: `{"type": "room_message", "roomId": ...}` for an entity or
    user room's members."""
    payload = _load_object(raw, max_bytes)
    if payload.get("type") != "room_message":
        raise InvalidInput("unknown_type")
    room = payload.get("roomId")
    if not isinstance(room, str) or not room.startswith(("entity_", "user_")) or not is_valid_room_part(room):
        raise InvalidInput("bad_room")
    return Routed(room_route(room), _for_tabs(payload))
