"""Which tabs here belong to which session and room: pure, no I/O (tested without a server,
like `tab_protocol.py`).

The core (`gateway.py`) asks the hub and acts on what it answers: a *first* member of a
session or room here means "claim the route in Redis", a *last* member leaving means "release
it". The hub also keeps the one ordering rule of carts: a tab is never sent a cart older than
one it was already sent (`accept_push`, `accept_reply`). A member is a `tab.Tab`; the words
(session, session hash, room, route) are defined in `tab.py`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, Protocol, TypeVar

from shared.protocol import room_route, session_hash


class Member(Protocol):
    session_hash: str | None  # the session it is in, if any
    cart_seq: int  # seq of the newest cart it was sent


M = TypeVar("M", bound=Member)


class Hub(Generic[M]):
    def __init__(self) -> None:
        self.sessions: dict[str, set[M]] = {}  # session hash -> its members here
        self.session_ids: dict[str, str] = {}  # session hash -> session id (to ask for carts)
        self.rooms: dict[str, set[M]] = {}  # room -> its members here

    # -- sessions --------------------------------------------------------------------------

    def join_session(self, member: M, session_id: str) -> tuple[str, bool, str | None]:
        """Put `member` in a session. Returns (session hash, first member here, the previous
        session's hash if `member` was its last member here)."""
        session = session_hash(session_id)
        if member.session_hash == session:
            return session, False, None
        released = self.leave_session(member)
        member.session_hash = session
        member.cart_seq = 0
        members = self.sessions.setdefault(session, set())
        members.add(member)
        self.session_ids[session] = session_id
        return session, len(members) == 1, released

    def leave_session(self, member: M) -> str | None:
        """Take `member` out of its session; returns the session hash if it was the last."""
        session, member.session_hash = member.session_hash, None
        if session is None or member not in self.sessions.get(session, ()):
            return None
        members = self.sessions[session]
        members.discard(member)
        if members:
            return None
        del self.sessions[session]
        del self.session_ids[session]
        return session

    def session_members(self, session: str) -> Iterable[M]:
        return self.sessions.get(session, ())

    def newest_seq(self, session: str, besides: M) -> int:
        """The newest cart seq any other member of the session here was sent (0: none)."""
        return max((m.cart_seq for m in self.sessions.get(session, ()) if m is not besides), default=0)

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
