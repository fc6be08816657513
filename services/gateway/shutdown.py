"""A gateway's shutdown, in one place, with one deadline derived from one setting.

On SIGTERM (`main.GatewayServer.shutdown`): stop accepting; `Gateway.drain` hands every tab
to the other gateways over `DRAIN_SECONDS`; then the routes are released (`Gateway.stop`) and
uvicorn finishes. Every duration of it is here, derived from `DRAIN_SECONDS`:

  drain window       DRAIN_SECONDS: `reconnect_required` with `retryAfterMs` spread over it,
                     and the remaining tabs closed (1001) paced evenly over it
  flush              FLUSH_SECONDS for the writers to send the last messages and closes
  release            RELEASE_SECONDS to release the routes in Redis and stop the loops
  total              `shutdown_seconds(DRAIN_SECONDS)`: uvicorn's graceful timeout
  grace period       `grace_period_seconds(DRAIN_SECONDS, pre_stop)`: what Kubernetes
                     (`terminationGracePeriodSeconds`) or compose (`stop_grace_period`) must
                     allow; tests/test_deploy.py checks the manifests against it

Socket.IO tabs drain the same way: their Engine.IO session is closed without a Socket.IO
DISCONNECT, so socket.io-client reconnects by itself (elsewhere, the gateway no longer listens).
"""

from __future__ import annotations

FLUSH_SECONDS = 5.0
RELEASE_SECONDS = 5.0


def shutdown_seconds(drain_seconds: float) -> float:
    """From SIGTERM to exit, at most."""
    return drain_seconds + FLUSH_SECONDS + RELEASE_SECONDS


def grace_period_seconds(drain_seconds: float, pre_stop_seconds: float = 0.0) -> float:
    """What the orchestrator must allow before it kills the process."""
    return pre_stop_seconds + shutdown_seconds(drain_seconds)
