"""Cart requests waiting for a fetcher's answer: tokens, deadlines, attempts. Pure, no I/O.

A request is a join (the tab joined: its cart comes as a push) or a get (the tab asked: the
reply carries its `requestId`). A join unanswered by its deadline is asked again, up to
`attempts` times; a get times out into an error reply. A reply older than the tab's cart
(possible only around a shard hand-over) is asked again too, within the same attempts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from shared.envelopes import GET, JOIN

C = TypeVar("C")

RETRY, EXPIRED = "retry", "expired"


@dataclass(slots=True)
class PendingRequest(Generic[C]):
    tab: C
    kind: str  # GET or JOIN
    request_id: Any
    has_request_id: bool
    deadline: float
    attempts: int = 1


class PendingRequests(Generic[C]):
    def __init__(self, *, timeout: float, attempts: int) -> None:
        self.timeout = timeout
        self.attempts = attempts
        self._pending: dict[int, PendingRequest[C]] = {}
        self._tokens = itertools.count(1)

    def __len__(self) -> int:
        return len(self._pending)

    def waiting(self) -> list[tuple[int, PendingRequest[C]]]:
        return list(self._pending.items())

    def add(self, tab: C, kind: str, request_id: Any, has_request_id: bool, now: float) -> int:
        token = next(self._tokens)
        self._pending[token] = PendingRequest(tab, kind, request_id, has_request_id, now + self.timeout)
        return token

    def answer(self, token: int) -> PendingRequest[C] | None:
        """The request a reply answers (None: answered already, or timed out)."""
        return self._pending.pop(token, None)

    def ask_again(self, token: int, pending: PendingRequest[C], now: float) -> bool:
        """Keep waiting after an unusable reply; False when its attempts are used up."""
        if pending.attempts >= self.attempts:
            return False
        pending.attempts += 1
        pending.deadline = now + self.timeout
        self._pending[token] = pending
        return True

    def due(self, now: float, gone: Any) -> list[tuple[str, int, PendingRequest[C]]]:
        """Requests past their deadline: (RETRY, token, request) for a join to send again,
        (EXPIRED, ...) for one given up. Requests of tabs for which `gone(tab)` holds
        are forgotten."""
        result = []
        for token, pending in list(self._pending.items()):
            if pending.deadline > now:
                continue
            if gone(pending.tab):
                del self._pending[token]
            elif pending.kind == JOIN and pending.attempts < self.attempts:
                pending.attempts += 1
                pending.deadline = now + self.timeout
                result.append((RETRY, token, pending))
            else:
                del self._pending[token]
                result.append((EXPIRED, token, pending))
        return result


__all__ = ["EXPIRED", "GET", "JOIN", "RETRY", "PendingRequest", "PendingRequests"]
