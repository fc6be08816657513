"""What one tab may ask of the gateway: token buckets for bad messages and for each costly message.

Valid messages cost work too (a session change costs a SQL query, a claim in Redis and a seq
key), so they have budgets, per tab: any message at all, and the costly types on their own.
Past a budget the tab gets `RATE_LIMITED` and is closed 1008, like a tab that sends bad
messages past `BAD_MESSAGE_BURST`. Budgets are named by message type, plus three of their own:

  any               every message
  new_session       an `update_session` to an id other than the tab's current one
  not_implemented   the request types this service answers only with an error, together
  connect           a Socket.IO CONNECT again on an Engine.IO session that had one (each
                    joins the session again: a join costs a cart)

A tab's buckets belong to its connection: a Socket.IO client that disconnects its namespace and
connects it again on the same Engine.IO session keeps them (`TabProtocol.budgets_of`).

`MESSAGE_BUDGETS` overrides any of them, or budgets another type: `name=burst/per_second`,
comma-separated (README; checked by `shared.settings`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from shared.protocol import BUDGET_ANY as ANY_MESSAGE
from shared.protocol import BUDGET_CONNECT as CONNECT
from shared.protocol import BUDGET_NEW_SESSION as NEW_SESSION
from shared.protocol import BUDGET_NOT_IMPLEMENTED as NOT_IMPLEMENTED

__all__ = [
    "ANY_MESSAGE",
    "CONNECT",
    "DEFAULT_BUDGETS",
    "NEW_SESSION",
    "NOT_IMPLEMENTED",
    "Budget",
    "Limits",
    "TokenBucket",
]


@dataclass(frozen=True, slots=True)
class Budget:
    """A token bucket's shape: `burst` at once, refilled at `per_second`."""

    burst: int
    per_second: float


DEFAULT_BUDGETS: Final[Mapping[str, Budget]] = {
    ANY_MESSAGE: Budget(60, 20.0),
    NEW_SESSION: Budget(3, 1 / 30),
    "get_partial_applications": Budget(10, 1.0),
    "session_message": Budget(20, 5.0),
    "room_message": Budget(20, 5.0),
    NOT_IMPLEMENTED: Budget(10, 1.0),
    "subscribe": Budget(60, 2.0),
    "unsubscribe": Budget(60, 2.0),
    "update_user_info": Budget(5, 0.1),
    CONNECT: Budget(3, 0.1),
}


class TokenBucket:
    """Allows `burst` at once, refilled at `rate` per second."""

    __slots__ = ("_at", "_burst", "_clock", "_rate", "_tokens")

    def __init__(self, burst: int, rate: float, clock: Callable[[], float]) -> None:
        self._burst = float(burst)
        self._rate = rate
        self._clock = clock
        self._tokens = float(burst)
        self._at = clock()

    def take(self) -> bool:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens >= 1:
            self._tokens -= 1
            return True
        return False


@dataclass(frozen=True, slots=True)
class Limits:
    """What every tab of a gateway may do (from its settings)."""

    bad_message_burst: int = 10
    bad_message_refill_per_second: float = 0.2
    max_rooms: int = 50  # entity subscriptions per tab
    budgets: Mapping[str, Budget] = field(default_factory=lambda: dict(DEFAULT_BUDGETS))

    @classmethod
    def of(cls, burst: int, refill_per_second: float, overrides: Iterable[tuple[str, int, float]]) -> Limits:
        """The defaults with a gateway's `MESSAGE_BUDGETS` overrides."""
        budgets = {**DEFAULT_BUDGETS, **{name: Budget(b, rate) for name, b, rate in overrides}}
        return cls(burst, refill_per_second, budgets=budgets)
