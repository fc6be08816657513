"""A socket's bounded outbox: fan-out never waits for a slow socket.

Producers `put` without blocking; the socket's writer task (started by the gateway when the
outbox goes from empty to not empty, ended when it is empty again) drains it with `pop`. A cart push is a full
snapshot, so a newer one replaces one still queued (latest wins) instead of queueing behind it.
When the outbox is full the socket is a slow consumer: `put` returns False and the driver closes
it (`CloseCode.TRY_AGAIN_LATER`); the client reconnects and gets the current cart.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class Outgoing:
    """One text to write to connections (a WebSocket text frame, or a Socket.IO "message"
    event); a push shares one Outgoing between all the connections it goes to. ("Frame" is
    left to the WebSocket protocol, and to the envelopes' `frame` field: a routed message's
    JSON text.)"""

    text: str
    kind: str  # message type, for metrics
    cart: bool = False  # a replaceable full-state cart push
    received_at: float | None = None  # trigger arrival, for the latency histogram
    seq: int = 0  # a cart push's seq (Socket.IO sends it as the connection-recovery offset)
    _size: int = -1

    @property
    def size(self) -> int:
        """UTF-8 length, computed once per frame rather than once per socket."""
        if self._size < 0:
            self._size = len(self.text.encode())
        return self._size


class Outbox:
    __slots__ = ("_frames", "_limit", "close_code", "close_reason")

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._frames: deque[Outgoing] | None = None  # created on the first frame: idle sockets stay small
        self.close_code: int | None = None  # set: the writer closes after the queued frames
        self.close_reason = ""

    def __len__(self) -> int:
        return len(self._frames) if self._frames else 0

    def put(self, frame: Outgoing) -> bool | None:
        """Queue a frame. Returns True if queued, None if it replaced a queued cart, False if
        the outbox is full (slow consumer)."""
        if self.close_code is not None:
            return True  # closing: drop silently
        if self._frames is None:
            self._frames = deque()
        if frame.cart:
            for i, queued in enumerate(self._frames):
                if queued.cart:
                    self._frames[i] = frame
                    return None
        if len(self._frames) >= self._limit:
            return False
        self._frames.append(frame)
        return True

    def close_after_flush(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason

    def pop(self) -> Outgoing | None:
        """The next frame, or None when empty (the writer then ends, or closes the socket)."""
        if not self._frames:
            return None
        frame = self._frames.popleft()
        if not self._frames:
            self._frames = None  # an empty deque is 600 bytes; most sockets are idle
        return frame
