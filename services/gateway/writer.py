"""Writing to tabs: at once when nothing waits before a message and the link takes it without
waiting (most pushes: no task, no queue); else each tab's bounded outbox, drained by a task that
exists only while it has something to write; and the slow-consumer policy.

Producers (`enqueue`, `send`) never wait. A tab whose outbox overflows (it stopped reading) or
whose write fails is *dropped*: taken out of every session and room at once (`detach`, the
core's), closed within CLOSE_DEADLINE_SECONDS, then aborted. Nothing else ever waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from shared.metrics import GatewayMetrics
from shared.protocol import CloseCode

from .outbox import Outgoing
from .rendering import stamp
from .tab import Tab

log = logging.getLogger(__name__)

CLOSE_DEADLINE_SECONDS = 2.0  # a dropped tab gets this long to take its close, then is aborted


class Writer:
    def __init__(self, metrics: GatewayMetrics, detach: Callable[[Tab], None]) -> None:
        self._metrics = metrics
        self._detach = detach  # out of every session and room (the core's)
        self._background: set[asyncio.Task[None]] = set()

    def send(self, tab: Tab, message: dict[str, Any]) -> None:
        """One of the gateway's own messages (timestamped here)."""
        kind = str(message.get("type"))
        if kind == "error":
            self._metrics.client_errors.labels(str(message.get("code"))).inc()
        self.enqueue(tab, Outgoing(stamp(message), kind))

    def enqueue(self, tab: Tab, outgoing: Outgoing) -> None:
        """Queue for `tab`; a full outbox makes it a slow consumer, dropped at once."""
        if not self.offer(tab, outgoing):
            self._slow(tab)

    def offer(self, tab: Tab, outgoing: Outgoing) -> bool:
        """Queue for `tab` unless its outbox is full (False: nothing queued, nothing dropped).
        A fan-out that meets a full outbox gives the writers a turn (`settle`) before it
        calls the tab slow: one Redis message can hold more messages for a tab than its outbox,
        and the writer cannot run while the fan-out does."""
        if tab.detached:
            return True
        if tab.writer is None and not tab.outbox and tab.outbox.close_code is None:
            # Nothing queued or in flight: written at once if the link takes it, with no task.
            try:
                written = tab.link.try_write(outgoing.text, outgoing.seq)
            except Exception as exc:
                self._failed(tab, exc)
                return True
            if written:
                self._sent(outgoing)
                return True
        result = tab.outbox.put(outgoing)
        if result is True:
            self._wake(tab)
        elif result is None:
            self._metrics.slow_consumers.labels("cart_replaced").inc()
        return result is not False

    async def settle(self, full: list[tuple[Tab, Outgoing]]) -> None:
        """`offer` found these outboxes full: let every writer run once (a tab that reads takes
        its whole outbox into its socket's buffer at once), then queue again; a tab still full
        is a slow consumer."""
        await asyncio.sleep(0)
        for tab, outgoing in full:
            self.enqueue(tab, outgoing)

    def _slow(self, tab: Tab) -> None:
        self._metrics.slow_consumers.labels("closed").inc()
        log.warning("tab %d: outbox full, dropping slow consumer", tab.id)  # once: detached now
        self.drop(tab, CloseCode.TRY_AGAIN_LATER, "slow consumer")

    def close_after_flush(self, tab: Tab, code: int, reason: str) -> None:
        tab.outbox.close_after_flush(code, reason)
        self._wake(tab)

    def _wake(self, tab: Tab) -> None:
        if tab.writer is None and not tab.detached:
            tab.writer = asyncio.get_running_loop().create_task(self._write(tab))

    async def _write(self, tab: Tab) -> None:
        """Write what is queued, then end (woken again by the next `enqueue`)."""
        try:
            while (outgoing := tab.outbox.pop()) is not None:
                await tab.link.write(outgoing.text, outgoing.seq)
                self._sent(outgoing)
            tab.writer = None  # before any await: a message queued from here on wakes a new one
            if tab.outbox.close_code is not None:
                await tab.link.close(tab.outbox.close_code, tab.outbox.close_reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self._failed(tab, exc)

    def _sent(self, outgoing: Outgoing) -> None:
        self._metrics.messages_sent.labels(outgoing.kind).inc()
        self._metrics.bytes_sent.inc(outgoing.size)
        if outgoing.received_at is not None:
            self._metrics.push_latency.observe(max(0.0, time.time() - outgoing.received_at))

    def _failed(self, tab: Tab, exc: Exception) -> None:
        # The peer went away mid-write, or the text could not be sent at all. Either way this
        # tab can no longer be served: a writer that silently ended left it open and deaf
        # (pings unanswered, pushes lost) while it stayed in every map.
        self._metrics.send_failures.inc()
        log.debug("tab %d: write failed (%s: %s); dropping it", tab.id, exc.__class__.__name__, exc)
        self.drop(tab, CloseCode.INTERNAL_ERROR, "write failed")

    def drop(self, tab: Tab, code: int, reason: str) -> None:
        """Stop serving a tab at once: detached now, closed within CLOSE_DEADLINE_SECONDS,
        aborted if the close cannot be written (a peer that does not read)."""
        if tab.detached:
            return
        self._detach(tab)
        if tab.writer is not None and tab.writer is not asyncio.current_task():
            tab.writer.cancel()
        self._spawn(self._close_or_abort(tab, code, reason))

    async def _close_or_abort(self, tab: Tab, code: int, reason: str) -> None:
        if tab.finished:
            return
        gone = tab.gone = asyncio.Event()
        try:
            async with asyncio.timeout(CLOSE_DEADLINE_SECONDS):
                await tab.link.close(code, reason)
                await gone.wait()
        except Exception:  # TimeoutError (the peer does not read) or already disconnected
            pass
        if not tab.finished:
            tab.link.abort()

    def _spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._background.add(task)  # keep a reference until done (asyncio holds weak ones)
        task.add_done_callback(self._background.discard)
