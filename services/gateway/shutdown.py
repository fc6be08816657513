"""A gateway's shutdown, in one place, with one deadline derived from one setting.

On SIGTERM (`main.GatewayServer.shutdown`): stop accepting; `drain` hands every tab to the
other gateways over `DRAIN_SECONDS`; then the routes are released and uvicorn finishes. Every
duration of it is here, derived from `DRAIN_SECONDS`:

  drain window       DRAIN_SECONDS: `reconnect_required` with `retryAfterMs` spread over it,
                     and the remaining tabs closed (1001) paced evenly over it
  flush              FLUSH_SECONDS for the writers to send the last frames and closes
  release            RELEASE_SECONDS to release the routes in Redis and stop the loops
  total              `shutdown_seconds(DRAIN_SECONDS)`: uvicorn's graceful timeout
  grace period       `grace_period_seconds(DRAIN_SECONDS, pre_stop)`: what Kubernetes
                     (`terminationGracePeriodSeconds`) or compose (`stop_grace_period`) must
                     allow; tests/test_deploy.py checks the manifests against it

Socket.IO tabs drain the same way: their Engine.IO session is closed without a Socket.IO
DISCONNECT, so socket.io-client reconnects by itself (elsewhere, the gateway no longer listens).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from typing import TYPE_CHECKING

from shared.protocol import CloseCode

if TYPE_CHECKING:
    from .app import Gateway

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0
RELEASE_SECONDS = 5.0


def shutdown_seconds(drain_seconds: float) -> float:
    """From SIGTERM to exit, at most."""
    return drain_seconds + FLUSH_SECONDS + RELEASE_SECONDS


def grace_period_seconds(drain_seconds: float, pre_stop_seconds: float = 0.0) -> float:
    """What the orchestrator must allow before it kills the process."""
    return pre_stop_seconds + shutdown_seconds(drain_seconds)


async def drain(gateway: Gateway) -> None:
    """Hand every tab over to the other gateways without a stampede or a lost update.

    Readiness turns false and new handshakes are refused at once. Every tab is told
    `reconnect_required` with a `retryAfterMs` spread over the drain window; tabs that do not
    close by themselves are closed with 1001, paced evenly over the same window (old clients
    reconnect a fixed time after the close). Until its socket closes a tab is still served:
    the subscription and the session leases stay up during the drain.
    """
    if gateway.draining:
        return
    gateway.draining = True
    gateway.metrics.draining.set(1)
    window = gateway.settings.drain_seconds
    clients = list(gateway.clients.values())
    random.shuffle(clients)
    log.info("draining %d socket(s) over %.1fs", len(clients), window)
    for client in clients:
        gateway.send(
            client,
            {
                "type": "reconnect_required",
                "message": "This server is restarting; please reconnect",
                "retryAfterMs": random.randint(0, int(window * 1000)),
            },
        )
    started = time.monotonic()
    for i, client in enumerate(clients):
        due = started + window * i / len(clients)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        gateway.close_after_flush(client, CloseCode.GOING_AWAY, "server restarting")
    writers = [c.writer for c in clients if c.writer is not None and not c.writer.done()]
    if writers:
        await asyncio.wait(writers, timeout=FLUSH_SECONDS)
