"""Natural batching: everything submitted while the previous round trip ran goes in the next one.

No timer and no added delay: a lone item is flushed at once; under a burst, items pile up while
one flush is in flight and leave together in the next (one Redis call for a connect storm of
2000 joins instead of 2000). A single task flushes, so a burst never becomes one task per item
talking to Redis.

`Batcher.submit` returns a future resolved when the batch holding the item has been flushed
(or has failed: the caller's work goes on; a failed batch is handed to `on_failure`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")


class Batcher(Generic[T]):
    def __init__(
        self,
        flush: Callable[[list[T]], Awaitable[None]],
        *,
        name: str,
        max_items: int = 500,
        on_failure: Callable[[list[T], Exception], None] | None = None,
    ) -> None:
        self._flush = flush
        self._name = name
        self._max_items = max_items
        self._on_failure = on_failure
        self._items: list[T] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._wanted = asyncio.Event()

    def submit(self, item: T) -> asyncio.Future[None]:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._items.append(item)
        self._waiters.append(future)
        self._wanted.set()
        return future

    def submit_nowait(self, item: T) -> None:
        """Submit without a future to await (fire and forget, still batched)."""
        self._items.append(item)
        self._wanted.set()

    async def run(self) -> None:
        """The flushing loop; run it as one supervised task per batcher."""
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            items, self._items = self._items, []
            waiters, self._waiters = self._waiters, []
            try:
                for start in range(0, len(items), self._max_items):
                    batch = items[start : start + self._max_items]
                    try:
                        await self._flush(batch)
                    except Exception as exc:
                        if self._on_failure is None:
                            log.warning("%s: batch of %d failed (%s)", self._name, len(batch), exc)
                        else:
                            self._on_failure(batch, exc)
            finally:  # also when stopped mid-flush: nobody waits forever
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(None)
