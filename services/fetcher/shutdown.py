"""A fetcher's shutdown, in one place: the order, and every duration of it.

On SIGTERM uvicorn stops accepting HTTP (health and metrics only), then runs the lifespan's
shutdown, `Fetcher.stop`:

  hand over          RELEASE_SECONDS: not ready at once; the shards are given up at a marker in
                     the message stream (`handover.py`): served up to it, the work of those
                     shards still queued or running is finished, then the leases are freed and
                     the others claim them on their next tick, serving from the marker on
  in flight          IN_FLIGHT_SECONDS: the subscription stops, and whatever work is left (a
                     retry, a request) finishes (a cart read but not published would be lost
                     until the next trigger); then the loops stop and the pools close
  HTTP               HTTP_SECONDS: uvicorn's graceful timeout for open health/metrics requests
  total              `shutdown_seconds()`
  grace period       `grace_period_seconds()`: what Kubernetes (`terminationGracePeriodSeconds`)
                     or compose (`stop_grace_period`) must allow; tests/test_deploy.py checks
                     the manifests against it

A fetcher killed before it released its leases costs `LEASE_TTL_SECONDS` of unserved shards
instead (the leases expire), never a lost cart: the gateways re-ask when the shards are taken.
"""

from __future__ import annotations

IN_FLIGHT_SECONDS = 7.0
RELEASE_SECONDS = 8.0
HTTP_SECONDS = 5.0


def shutdown_seconds() -> float:
    """From SIGTERM to exit, at most."""
    return HTTP_SECONDS + IN_FLIGHT_SECONDS + RELEASE_SECONDS


def grace_period_seconds(pre_stop_seconds: float = 0.0) -> float:
    """What the orchestrator must allow before it kills the process."""
    return pre_stop_seconds + shutdown_seconds()
