"""One tab's protocol, without I/O: messages in -> actions out (PROTOCOL.md §2-§4).

`TabProtocol` decides; the gateway core (`gateway.py`) carries out the actions (send a
message, join a session, ask a fetcher for the cart, relay to the other tabs, close) and the
transports only move text. Tests drive it directly: no server, no sleeps (the clock is
injected). What a tab may ask, and how often, is `budgets.py`.
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import urlsplit

from shared.codec import loads_strict
from shared.protocol import (
    CloseCode,
    ErrorCode,
    entity_room_id,
    error_message,
    is_valid_room_part,
    is_valid_session_id,
    mask_session_id,
    session_room_id,
    user_room_id,
)

from .budgets import ANY_MESSAGE, NEW_SESSION, NOT_IMPLEMENTED, Limits, TokenBucket
from .rendering import stamp

_INT_LIKE = re.compile(r"[0-9]{1,18}")  # not \d: it matches "١٢" and other scripts' digits
MAX_USER_ID: Final = 2**63 - 1  # a PostgreSQL bigint: user ids beyond it are not ids, and become room names
NO_SESSION_MESSAGE: Final = "No session found"
DEFAULT_USER_TYPE: Final = "bookinguser"  # user room of update_user_info without userType


# -- actions -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class JoinSession:
    """Leave the current session room (if any), join `session_id`'s, then send `replies`
    (built by the driver, which knows the room size) and ask for the cart as a push."""

    session_id: str
    via_cookie: bool
    action: str = "set"  # set / updated / none (update_session only)
    was_required: bool = False
    # Socket.IO: the seq of the cart the tab says it shows (its recovery offset); 0: none
    known_seq: int = 0


@dataclass(frozen=True, slots=True)
class RequestCart:
    request_id: Any  # echoed as top-level requestId; None when the client sent none
    has_request_id: bool


@dataclass(frozen=True, slots=True)
class RelayToSession:
    """A tab's session_message for the other tabs of its session, on every gateway (`text`:
    the `room_message` to deliver, encoded once)."""

    text: str


@dataclass(frozen=True, slots=True)
class RelayToRoom:
    """A member's room_message for the other members of an entity room, on every gateway."""

    room_id: str
    text: str  # the room_message to deliver, encoded once


@dataclass(frozen=True, slots=True)
class JoinRoom:
    """Join an entity or user room, then send `replies` (the driver adds `room_joined`'s
    roomSize to the first one when it is a room_joined)."""

    room_id: str
    replies: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class LeaveRoom:
    room_id: str
    replies: tuple[dict[str, Any], ...] = ()


@dataclass(frozen=True, slots=True)
class Close:
    code: int
    reason: str


Action = Send | JoinSession | RequestCart | RelayToSession | RelayToRoom | JoinRoom | LeaveRoom | Close


# -- pure helpers --------------------------------------------------------------------------


def is_echoable(value: object) -> bool:
    """A client's id that a reply may carry back: a string, an integer or a finite number.
    `1e400` is valid JSON (unlike `NaN`) and parses as `inf`, which no JSON can carry: echoing it
    made the reply unencodable, and the tab was closed 1011 as if the server had failed."""
    if isinstance(value, bool):
        return False
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str | int)


def session_from_cookie(header: str | None, names: tuple[str, ...]) -> tuple[str | None, bool]:
    """The session id from a Cookie header, by cookie-name preference.

    Returns (session_id, invalid): a cookie that is present but not a valid PHP session id gives
    (None, True).
    """
    if not header:
        return None, False
    cookies: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in cookies:
            cookies[name] = value.strip().strip('"')
    for name in names:
        if name in cookies:
            value = cookies[name]
            return (value, False) if is_valid_session_id(value) else (None, True)
    return None, False


def is_origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...], scheme: str) -> bool:
    """Cross-site WebSocket hijacking guard (PROTOCOL.md §2).

    No Origin header (not a browser): allowed. `allowed` empty: same origin only, meaning the
    Origin's scheme is `scheme` (the scheme the page was served with: `https` behind a TLS
    proxy, see `TRUST_FORWARDED_PROTO`) and its host[:port] equals the Host header; an
    `http://site` page is another origin than `https://site`. Otherwise an exact origin from
    the list, or `*`.
    """
    if origin is None:
        return True
    origin = origin.strip().rstrip("/").lower()
    if allowed:
        return "*" in allowed or origin in {a.lower() for a in allowed}
    if not host:
        return False
    try:
        parts = urlsplit(origin)
    except ValueError:
        return False
    return parts.scheme == scheme and parts.netloc != "" and parts.netloc == host.strip().lower()


def page_scheme(connection_scheme: str, forwarded_proto: str | None, trust_forwarded: bool) -> str:
    """The scheme a same-origin page was served with: `X-Forwarded-Proto` (first value) when the
    proxy in front is trusted to set it, else the connection's own (`ws` -> `http`)."""
    if trust_forwarded and forwarded_proto:
        proto = forwarded_proto.split(",")[0].strip().lower()
        if proto in ("http", "https", "ws", "wss"):
            connection_scheme = proto
    return "https" if connection_scheme in ("https", "wss") else "http"


# -- the protocol --------------------------------------------------------------------------


@dataclass(slots=True)
class TabProtocol:
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.monotonic
    session_id: str | None = None
    user_id: int | None = None
    user_room: str | None = None
    session_required: bool = False  # connected without a session cookie
    rooms: set[str] = field(default_factory=set)  # entity and user rooms joined
    closed: bool = False
    # The token buckets (`budgets.py`): created here, or those of the connection's earlier
    # protocol (`budgets_of`), so that a Socket.IO namespace reconnect resets nothing.
    bad_budget: TokenBucket | None = None
    budgets: dict[str, TokenBucket] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.bad_budget is None:
            self.bad_budget = TokenBucket(
                self.limits.bad_message_burst, self.limits.bad_message_refill_per_second, self.clock
            )

    def budgets_of(self) -> dict[str, Any]:
        """This protocol's buckets, for the next protocol of the same connection:
        `TabProtocol(limits, **previous.budgets_of())`."""
        return {"bad_budget": self.bad_budget, "budgets": self.budgets, "clock": self.clock}

    def spend(self, name: str) -> bool:
        """Take a token of budget `name` (and of `any`); False when either is spent."""
        return self._within_budget(ANY_MESSAGE) and self._within_budget(name)

    def _within_budget(self, name: str) -> bool:
        budget = self.limits.budgets.get(name)
        if budget is None:
            return True
        bucket = self.budgets.get(name)
        if bucket is None:  # created on first use: most tabs only ever send a few types
            bucket = self.budgets[name] = TokenBucket(budget.burst, budget.per_second, self.clock)
        return bucket.take()

    @property
    def room_id(self) -> str | None:
        return session_room_id(self.session_id) if self.session_id else None

    def on_open(
        self, cookie_session: str | None, cookie_invalid: bool = False, *, known_seq: int = 0
    ) -> list[Action]:
        actions: list[Action] = []
        if cookie_invalid:
            actions.append(
                Send(
                    error_message(
                        ErrorCode.INVALID_SESSION_ID, "The session cookie is not a valid session id"
                    )
                )
            )
        if cookie_session is not None:
            self.session_id = cookie_session
            actions.append(JoinSession(cookie_session, via_cookie=True, known_seq=known_seq))
            return actions
        self.session_required = True
        actions.append(
            Send(
                {
                    "type": "session_id_required",
                    "message": "No session cookie; send update_session with your sessionId",
                    "code": ErrorCode.NO_SESSION,
                }
            )
        )
        return actions

    def on_binary(self) -> list[Action]:
        return self._close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")

    def on_foreign(self, description: str) -> list[Action]:
        """Input the protocol has no message for (a Socket.IO event other than "message")."""
        if self.closed:
            return []
        return self._bad_message(ErrorCode.UNSUPPORTED_MESSAGE_TYPE, f"{description} is not supported")

    def on_text(self, text: str) -> list[Action]:
        """A raw WebSocket text frame."""
        if self.closed:
            return []
        try:
            message = loads_strict(text)
        except ValueError:
            return self._bad_message(ErrorCode.INVALID_JSON, "Message is not valid JSON")
        return self.on_message(message)

    def on_message(self, message: Any) -> list[Action]:
        """A message already parsed as strict JSON (`shared.codec.loads_strict`): a raw frame's,
        or the argument of a Socket.IO "message" event, parsed once by its packet decoder."""
        if self.closed:
            return []
        if not isinstance(message, dict):
            return self._bad_message(ErrorCode.INVALID_JSON, "Message must be a JSON object")
        kind = message.get("type")
        if not isinstance(kind, str):  # a list or an object is no type (and no dict key either)
            text = "Message has no type" if kind is None else "Message type must be a string"
            return self._bad_message(ErrorCode.UNSUPPORTED_MESSAGE_TYPE, text)
        handler = _HANDLERS.get(kind)
        if handler is None and kind in UNSERVED_REQUESTS:
            if not (self._within_budget(ANY_MESSAGE) and self._within_budget(NOT_IMPLEMENTED)):
                return self.rate_limited(f"Too many {kind} messages; closing")
            return [Send(unserved_reply(message))]
        if handler is None:
            return self._bad_message(
                ErrorCode.UNSUPPORTED_MESSAGE_TYPE, f"Message type {kind[:40]!r} is not supported"
            )
        if not (self._within_budget(ANY_MESSAGE) and self._within_budget(kind)):
            return self.rate_limited(f"Too many {kind} messages; closing")
        return handler(self, message)

    # -- handlers --------------------------------------------------------------------------

    def _on_ping(self, message: dict[str, Any]) -> list[Action]:
        ping_id = message.get("id")
        return [
            Send(
                {
                    "type": "pong",
                    "id": f"pong_{uuid.uuid4().hex[:12]}",
                    "reply_to": ping_id if is_echoable(ping_id) else None,
                }
            )
        ]

    def _on_silent(self, message: dict[str, Any]) -> list[Action]:
        return []

    def _on_update_session(self, message: dict[str, Any]) -> list[Action]:
        new = message.get("sessionId")
        if not is_valid_session_id(new):
            return self._bad_message(
                ErrorCode.INVALID_SESSION_ID,
                "sessionId must be 1-128 characters of A-Z, a-z, 0-9, ',' and '-'",
            )
        assert isinstance(new, str)
        previous = self.session_id
        if new != previous and not self._within_budget(NEW_SESSION):
            return self.rate_limited("Too many session changes; closing")
        action = "set" if previous is None else ("none" if previous == new else "updated")
        was_required = self.session_required
        self.session_id = new
        self.session_required = False
        return [JoinSession(new, via_cookie=False, action=action, was_required=was_required)]

    def _on_update_user_info(self, message: dict[str, Any]) -> list[Action]:
        user_id = message.get("userId")
        if isinstance(user_id, str) and _INT_LIKE.fullmatch(user_id.strip()):
            user_id = int(user_id)
        if not isinstance(user_id, int) or isinstance(user_id, bool) or not 0 < user_id <= MAX_USER_ID:
            return self._bad_message(ErrorCode.INVALID_MESSAGE, "userId must be a positive integer (bigint)")
        user_type = message.get("userType", DEFAULT_USER_TYPE)
        if not is_valid_room_part(user_type):
            return self._bad_message(ErrorCode.INVALID_MESSAGE, "userType must be a short identifier")
        actions: list[Action] = []
        previous = self.user_room
        self.user_id = user_id
        self.user_room = user_room_id(user_type, user_id)
        if previous is not None and previous != self.user_room:
            self.rooms.discard(previous)
            actions.append(LeaveRoom(previous))
        self.rooms.add(self.user_room)
        confirmation = {
            "type": "user_info_update_confirmation",
            "success": True,
            "message": "User info updated",
            "userId": user_id,
        }
        actions.append(JoinRoom(self.user_room, (confirmation,)))
        return actions

    def _on_subscribe(self, message: dict[str, Any]) -> list[Action]:
        entity_type, entity_id = message.get("entityType"), message.get("entityId")
        if not (is_valid_room_part(entity_type) and is_valid_room_part(entity_id)):
            return self._bad_message(
                ErrorCode.INVALID_MESSAGE,
                "entityType and entityId must be short identifiers (A-Z, 0-9, _ . : -)",
            )
        room = entity_room_id(entity_type, entity_id)
        if room not in self.rooms and len(self.rooms) >= self.limits.max_rooms:
            return self._bad_message(
                ErrorCode.INVALID_MESSAGE, f"At most {self.limits.max_rooms} subscriptions"
            )
        self.rooms.add(room)
        joined = {
            "type": "room_joined",
            "roomId": room,
            "roomType": "entity",
            "entityType": entity_type,
            "entityId": entity_id,
            "message": f"Subscribed to {entity_type} {entity_id}",
        }
        confirmation = {
            "type": "subscription_confirmation",
            "entityType": entity_type,
            "entityId": entity_id,
            "status": "subscribed",
        }
        return [JoinRoom(room, (joined, confirmation))]

    def _on_unsubscribe(self, message: dict[str, Any]) -> list[Action]:
        entity_type, entity_id = message.get("entityType"), message.get("entityId")
        if not (is_valid_room_part(entity_type) and is_valid_room_part(entity_id)):
            return self._bad_message(
                ErrorCode.INVALID_MESSAGE, "entityType and entityId must be short identifiers"
            )
        room = entity_room_id(entity_type, entity_id)
        self.rooms.discard(room)
        confirmation = {
            "type": "subscription_confirmation",
            "entityType": entity_type,
            "entityId": entity_id,
            "status": "unsubscribed",
        }
        return [LeaveRoom(room, (confirmation,))]

    def _on_get_partial_applications(self, message: dict[str, Any]) -> list[Action]:
        has_request_id = "requestId" in message
        request_id = message.get("requestId")
        if has_request_id and request_id is not None and not is_echoable(request_id):
            return self._bad_message(
                ErrorCode.INVALID_MESSAGE, "requestId must be a string or a finite number"
            )
        if self.session_id is None:
            reply: dict[str, Any] = {
                "type": "partial_applications_response",
                "data": {"error": True, "status": "error", "message": NO_SESSION_MESSAGE},
            }
            if has_request_id:
                reply["requestId"] = request_id
            return [Send(reply)]
        return [RequestCart(request_id, has_request_id)]

    def _on_room_message(self, message: dict[str, Any]) -> list[Action]:
        room = message.get("roomId")
        if not isinstance(room, str) or not room.startswith("entity_") or room not in self.rooms:
            return self._bad_message(
                ErrorCode.ROOM_ACCESS_DENIED, "Subscribe to an entity room before sending to it"
            )
        text = self._relayable({**message, "type": "room_message"})
        return self._not_relayable() if text is None else [RelayToRoom(room, text)]

    def _on_session_message(self, message: dict[str, Any]) -> list[Action]:
        if self.session_id is None:
            return self._bad_message(ErrorCode.NO_SESSION, "Join a session before sending session messages")
        text = self._relayable({**message, "type": "room_message", "roomId": self.room_id})
        return self._not_relayable() if text is None else [RelayToSession(text)]

    @staticmethod
    def _relayable(message: dict[str, Any]) -> str | None:
        """The JSON text other tabs are sent, or None when the message has no JSON form: a
        number like `1e400` parses (as `inf`) but cannot be written again, and raising in the
        gateway closed the *sender* 1011."""
        try:
            return stamp(message)
        except (ValueError, RecursionError):
            return None

    def _not_relayable(self) -> list[Action]:
        return self._bad_message(
            ErrorCode.INVALID_MESSAGE, "Message has a number JSON cannot carry (such as 1e400)"
        )

    # -- trouble ---------------------------------------------------------------------------

    def _bad_message(self, code: str, text: str) -> list[Action]:
        assert self.bad_budget is not None
        if self.bad_budget.take():
            return [Send(error_message(code, text))]
        return self.rate_limited("Too many invalid messages; closing", "too many invalid messages")

    def rate_limited(self, text: str, reason: str = "message budget exceeded") -> list[Action]:
        return [
            Send(error_message(ErrorCode.RATE_LIMITED, text)),
            *self._close(CloseCode.POLICY_VIOLATION, reason),
        ]

    def _close(self, code: int, reason: str) -> list[Action]:
        self.closed = True
        return [Close(code, reason)]


_HANDLERS: dict[str, Callable[[TabProtocol, dict[str, Any]], list[Action]]] = {
    "ping": TabProtocol._on_ping,
    "pong": TabProtocol._on_silent,
    "room_ping_response": TabProtocol._on_silent,
    "update_session": TabProtocol._on_update_session,
    "update_user_info": TabProtocol._on_update_user_info,
    "get_partial_applications": TabProtocol._on_get_partial_applications,
    "session_message": TabProtocol._on_session_message,
    "room_message": TabProtocol._on_room_message,
    "subscribe": TabProtocol._on_subscribe,
    "unsubscribe": TabProtocol._on_unsubscribe,
}


# -- request types of today's frontend that this service does not serve --------------------
# Each gets an immediate error reply in the type and with the id field its client matches on,
# instead of silence until the client's own 5 to 15 s timeout. The frontend falls back to REST
# for create/delete only when the error message contains "timeout" (any other error is shown
# to the user as a failed action), so those replies say "timeout": the action then happens
# over REST at once. The others have no REST fallback: a prompt error only ends the wait.

_REST_FALLBACK = "Not available on this real-time server (timeout: use the REST endpoint)"
_UNAVAILABLE = "Not available on this real-time server"
# request type -> (reply type, message, the request field echoed inside `data` for matching)
UNSERVED_REQUESTS: Final = {
    "create_simple_application": ("create_application_response", _REST_FALLBACK, None),
    "delete_partial_application": ("delete_application_response", _REST_FALLBACK, None),
    "get_free_time": ("free_time_response", _UNAVAILABLE, "buildingId"),
    "get_application_detail": ("application_detail_response", _UNAVAILABLE, "id"),
    "get_delivered_applications": ("delivered_applications_response", _UNAVAILABLE, None),
    # the reply type the frontend waits for is `add_comment_response` (PROTOCOL.md §3), not
    # `add_application_comment_response`: that one went unread and the frontend timed out (8 s)
    "add_application_comment": ("add_comment_response", _UNAVAILABLE, None),
}


def unserved_reply(message: dict[str, Any]) -> dict[str, Any]:
    reply_type, text, echoed = UNSERVED_REQUESTS[message["type"]]
    data: dict[str, Any] = {"error": True, "status": "error", "message": text}
    if echoed is not None and is_echoable(message.get(echoed)):
        data[echoed] = message[echoed]
    reply: dict[str, Any] = {"type": reply_type, "data": data}
    request_id = message.get("requestId")
    if is_echoable(request_id):
        reply["requestId"] = request_id  # create, delete and comment clients match on it
    return reply


# -- messages the core builds once it knows the room size -----------------------------------


def joined_messages(action: JoinSession, room_size: int) -> list[dict[str, Any]]:
    room = session_room_id(action.session_id)
    if action.via_cookie:
        return [
            {
                "type": "connection_success",
                "message": "Connected to Portico push",
                "roomId": room,
                "rooms": [{"id": room, "size": room_size, "type": "session"}],
            }
        ]
    return [
        {
            "type": "room_joined",
            "roomId": room,
            "roomType": "session",
            "message": "Joined session room",
            "roomSize": room_size,
        },
        {
            "type": "session_update_confirmation",
            "success": True,
            "message": {
                "set": "Session set",
                "updated": "Session updated",
                "none": "Session unchanged",
            }[action.action],
            "action": action.action,
            "wasRequired": action.was_required,
            "sessionId": mask_session_id(action.session_id),
        },
    ]
