"""Parsing what the PHP backend publishes on `session_messages` (PROTOCOL.md §5.1, §6).

Pure: bytes in, a `Trigger` out, or `InvalidInput` with a reason that is safe to log and to use
as a metric label (the session id in it is masked).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Final

from shared.codec import dumps
from shared.protocol import is_valid_session_id, mask_session_field, mask_session_id, now_iso

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
    frame: str | None = None  # for routed types: the JSON text to deliver to the tabs


def parse_session_message(raw: bytes | str, max_bytes: int) -> Trigger:
    if len(raw) > max_bytes:
        raise InvalidInput("too_large", f"{len(raw)} bytes")
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError):
        raise InvalidInput("not_json") from None
    if not isinstance(payload, dict):
        raise InvalidInput("not_object")
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
        return Trigger(kind, session_id, dumps(_with_timestamp(mask_session_field(dict(data)))))
    message = payload.get("message")
    frame: dict[str, Any] = {
        "type": REFRESH_BOOKINGUSER,
        "message": message if isinstance(message, str) else "Booking user information changed",
        "action": "refresh",
        "timestamp": payload.get("timestamp") if isinstance(payload.get("timestamp"), str) else now_iso(),
    }
    return Trigger(kind, session_id, dumps(frame))


def _with_timestamp(message: dict[str, Any]) -> dict[str, Any]:
    message.setdefault("timestamp", now_iso())
    return message
