"""A tab's bounded outbox: fan-out never waits for a slow tab.

Producers `put` without blocking; the tab's writer task (`writer.py`: started when the outbox
goes from empty to not empty, ended when it is empty again) drains it with `pop`. A cart push
is a full snapshot, so a newer one replaces one still queued (latest wins) instead of queueing
behind it. When the outbox is full the tab is a slow consumer: `put` returns False and the
writer drops it (`CloseCode.TRY_AGAIN_LATER`); the client reconnects and gets the current cart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class Outgoing:
    """One message to write to tabs (a WebSocket text frame, or a Socket.IO "message" event);
    a push shares one Outgoing between all the tabs it goes to."""

    text: str
    kind: str  # message type, for metrics
    cart: bool = False  # a replaceable full-state cart push
    received_at: float | None = None  # trigger arrival, for the latency histogram
    seq: int = 0  # a cart push's seq (Socket.IO sends it as the connection-recovery offset)
    _size: int = -1

    @property
    def size(self) -> int:
        """UTF-8 length, computed once per message rather than once per tab."""
        if self._size < 0:
            self._size = len(self.text.encode())
        return self._size


class Outbox:
    __slots__ = ("_limit", "_queued", "close_code", "close_reason")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._queued: deque[Outgoing] | None = None  # created on the first message: idle tabs stay small
        self.close_code: int | None = None  # set: the writer closes after the queued messages
        self.close_reason = ""

    def __len__(self) -> int:
        return len(self._queued) if self._queued else 0

    def put(self, outgoing: Outgoing) -> bool | None:
        """Queue a message. Returns True if queued, None if it replaced a queued cart, False if
        the outbox is full (slow consumer)."""
        if self.close_code is not None:
            return True  # closing: drop silently
        if self._queued is None:
            self._queued = deque()
        if outgoing.cart:
            for i, queued in enumerate(self._queued):
                if queued.cart:
                    self._queued[i] = outgoing
                    return None
        if len(self._queued) >= self._limit:
            return False
        self._queued.append(outgoing)
        return True

    def close_after_flush(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def pop(self) -> Outgoing | None:
        """The next message, or None when empty (the writer then ends, or closes the tab)."""
        if not self._queued:
            return None
        outgoing = self._queued.popleft()
        if not self._queued:
            self._queued = None  # an empty deque is 600 bytes; most tabs are idle
        return outgoing
