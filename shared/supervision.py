"""Background loops are started supervised: one that dies is loud, recorded, and acted upon.

A service's loops (subscription, leases, ownership refresh, ...) run until cancelled; ending any
other way is a bug. Logging it is not enough: a fetcher whose subscription task died kept its
shard leases and black-holed their sessions while `/healthz` stayed green. So a death also
runs the service's `on_death` (turn unhealthy, release what it holds), and is recorded in
`deaths` so that the test suite fails any test during which a background task died.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

log = logging.getLogger(__name__)

deaths: list[str] = []  # "name: exception" of every background task that died in this process


def supervise(task: asyncio.Task[None], on_death: Callable[[str], None] | None = None) -> None:
    def done(task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        what = f"{task.get_name()}: {exc.__class__.__name__}: {exc}"
        deaths.append(what)
        log.error("background task %r died", task.get_name(), exc_info=exc)
        if on_death is not None:
            on_death(what)

    task.add_done_callback(done)
