"""Which local connections belong to which session and room: pure, no I/O (tested without a
server, like `connection.py`).

The gateway (`app.py`) asks the hub and acts on what it answers: a *first* member of a session
or room here means "claim the route in Redis", a *last* member leaving means "release it". The
hub also keeps the one ordering rule of carts: a connection is never sent a cart older than
one it was already sent (`accept_push`, `accept_reply`).

Words, as used across the gateway:
  session id    the PHP session id (secret; only its first 8 characters are ever logged)
  session key   SHA-256 hex of the session id: names the session in Redis and in envelopes
  room          an entity or user room (`entity_<type>_<id>`, `user_<type>_<id>`)
  route         what Redis ownership is kept for: a session key, or `room:<room>`
  member        a local connection (`app.Client`), on either transport
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from shared.protocol import room_route, session_key


class Member(Protocol):
    session_key: str | None  # the session it is in, if any
    cart_seq: int  # seq of the newest cart it was sent


M = TypeVar("M", bound=Member)


class Hub(Generic[M]):
    def __init__(self) -> None:
        self.sessions: dict[str, set[M]] = {}  # session key -> its members here
        self.session_ids: dict[str, str] = {}  # session key -> session id (to ask for carts)
        self.rooms: dict[str, set[M]] = {}  # room -> its members here

    # -- sessions --------------------------------------------------------------------------

    def join_session(self, member: M, session_id: str) -> tuple[str, bool, str | None]:
        """Put `member` in a session. Returns (session key, first member here, the previous
        session's key if `member` was its last member here)."""
        key = session_key(session_id)
        if member.session_key == key:
            return key, False, None
        released = self.leave_session(member)
        member.session_key = key
        member.cart_seq = 0
        members = self.sessions.setdefault(key, set())
        members.add(member)
        self.session_ids[key] = session_id
        return key, len(members) == 1, released

    def leave_session(self, member: M) -> str | None:
        """Take `member` out of its session; returns the session key if it was the last."""
        key, member.session_key = member.session_key, None
        if key is None or member not in self.sessions.get(key, ()):
            return None
        members = self.sessions[key]
        members.discard(member)
        if members:
            return None
        del self.sessions[key]
        del self.session_ids[key]
        return key

    def session_members(self, key: str) -> Iterable[M]:
        return self.sessions.get(key, ())

    def newest_seq(self, key: str, besides: M) -> int:
        """The newest cart seq any other member of the session here was sent (0: none)."""
        return max((m.cart_seq for m in self.sessions.get(key, ()) if m is not besides), default=0)

    # -- rooms -----------------------------------------------------------------------------

    def join_room(self, member: M, room: str) -> tuple[bool, int]:
        """Returns (first member here, members here now)."""
        members = self.rooms.setdefault(room, set())
        if member in members:
            return False, len(members)
        members.add(member)
        return len(members) == 1, len(members)

    def leave_room(self, member: M, room: str) -> bool:
        """Returns True if `member` was the room's last member here."""
        members = self.rooms.get(room)
        if members is None or member not in members:
            return False
        members.discard(member)
        if members:
            return False
        del self.rooms[room]
        return True

    def room_members(self, room: str) -> Iterable[M]:
        return self.rooms.get(room, ())

    # -- routes ----------------------------------------------------------------------------

    def routes(self) -> list[str]:
        return [*self.sessions, *(room_route(room) for room in self.rooms)]

    def holds(self, route: str) -> bool:
        if route.startswith("room:"):
            return route.removeprefix("room:") in self.rooms
        return route in self.sessions

    # -- the cart rule ---------------------------------------------------------------------

    @staticmethod
    def accept_push(member: M, seq: int) -> bool:
        """A pushed cart goes to `member` only if newer than every cart it was sent."""
        if seq <= member.cart_seq:
            return False
        member.cart_seq = seq
        return True

    @staticmethod
    def accept_reply(member: M, seq: int) -> bool:
        """A reply to a request goes out unless older than a cart `member` already has (then
        the request is asked again); an equal seq is the same cart, sent as asked."""
        if seq < member.cart_seq:
            return False
        member.cart_seq = seq
        return True
