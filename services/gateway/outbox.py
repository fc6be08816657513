"""A socket's bounded outbox: fan-out never waits for a slow socket.

Producers `put` without blocking; one writer task per socket drains it. A cart push is a full
snapshot, so a newer one replaces one still queued (latest wins) instead of queueing behind it.
When the outbox is full the socket is a slow consumer: `put` returns False and the driver closes
it (`CloseCode.TRY_AGAIN_LATER`); the client reconnects and gets the current cart.
"""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass


@dataclass(slots=True)
class Frame:
    """One text frame; a push shares one Frame between all the sockets it goes to."""

    text: str
    kind: str  # message type, for metrics
    cart: bool = False  # a replaceable full-state cart push
    received_at: float | None = None  # trigger arrival, for the latency histogram
    _size: int = -1

    @property
    def size(self) -> int:
        """UTF-8 length, computed once per frame rather than once per socket."""
        if self._size < 0:
            self._size = len(self.text.encode())
        return self._size


class Outbox:
    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._frames: deque[Frame] = deque()
        self._ready = asyncio.Event()
        self.close_code: int | None = None  # set: the writer closes after the queued frames
        self.close_reason = ""

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, frame: Frame) -> bool | None:
        """Queue a frame. Returns True if queued, None if it replaced a queued cart, False if
        the outbox is full (slow consumer)."""
        if self.close_code is not None:
            return True  # closing: drop silently
        if frame.cart:
            for i, queued in enumerate(self._frames):
                if queued.cart:
                    self._frames[i] = frame
                    return None
        if len(self._frames) >= self._limit:
            return False
        self._frames.append(frame)
        self._ready.set()
        return True

    def close_after_flush(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self._ready.set()

    async def get(self) -> Frame | None:
        """The next frame; None when the outbox is closing and empty."""
        while not self._frames:
            if self.close_code is not None:
                return None
            self._ready.clear()
            await self._ready.wait()
        return self._frames.popleft()
