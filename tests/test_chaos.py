"""Chaos: faults under a steady load of versioned cart changes, on real processes.

The fleet (`tests/support/chaos.py`): 3 gateways and 2 fetchers as separate processes (so they
can be SIGKILLed) against a Redis and a PostgreSQL this test starts itself (so they can be
restarted), 40 sessions of 3 tabs that reconnect like the browser client, and a loader that
changes a random session's cart 40 times a second and publishes the trigger. For each fault:
load, fault, heal, load, stop the load, then measure how long until every tab shows its
session's final version. Asserted for every fault: every tab converges within
`CONVERGENCE_BOUND` seconds, no tab ever sees `seq` go back, and no final state is lost. The
figures are printed (`make chaos` shows them) and quoted in the README. Redis's own faults
(Sentinel and Cluster failovers, a reshard) are in `test_chaos_redis.py`.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator

import pytest

from services.localservers import LocalPostgres, LocalRedis
from tests.support.chaos import CHANGES_PER_SECOND, SESSIONS, Fleet, restart, running_fleet, seq_went_back

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.slow]


@pytest.fixture
async def chaos() -> AsyncIterator[tuple[Fleet, LocalRedis, LocalPostgres]]:
    redis = LocalRedis().start()
    postgres = LocalPostgres().start()
    try:
        async with running_fleet({"REDIS_URL": redis.url}, redis.url, postgres.url) as fleet:
            yield fleet, redis, postgres
    finally:
        postgres.cleanup()
        redis.cleanup()


async def test_every_tab_converges_after_every_fault(chaos):
    fleet, redis, postgres = chaos
    loader = fleet.loader
    figures: list[tuple[str, float, int]] = []

    async def fault(name: str, inject, heal) -> None:
        await loader.run_for(1.0)
        await inject()
        await loader.run_for(2.0)
        await heal()
        await loader.run_for(1.0)
        before = loader.version
        seconds = await fleet.converge(name)
        figures.append((name, seconds, before))

    gateway, fetcher = fleet.gateways[0], fleet.fetchers[0]

    async def nothing() -> None:
        pass

    async def kill_gateway() -> None:
        gateway.signal(signal.SIGKILL)
        await gateway.wait_exit()

    async def restart_gateway() -> None:
        gateway.start()
        await gateway.wait_ready()

    async def kill_fetcher() -> None:
        fetcher.signal(signal.SIGKILL)
        await fetcher.wait_exit()

    async def restart_fetcher() -> None:
        fetcher.start()
        await fetcher.wait_ready()

    async def stop_redis() -> None:
        redis.stop()
        await asyncio.sleep(3)

    async def start_redis() -> None:
        redis.start()

    async def stop_postgres() -> None:
        postgres.stop("fast")  # asyncpg raised InternalClientError on this one
        await asyncio.sleep(5)

    async def start_postgres() -> None:
        postgres.start()

    async def rolling_restart() -> None:
        for service in fleet.gateways:
            await restart(service, signal.SIGTERM)

    await fault("SIGKILL a gateway (restarted)", kill_gateway, restart_gateway)
    await fault("SIGKILL a fetcher (restarted)", kill_fetcher, restart_fetcher)
    await fault("Redis stopped 3 s and restarted empty", stop_redis, start_redis)
    await fault("PostgreSQL fast shutdown for 5 s", stop_postgres, start_postgres)
    await fault("SIGTERM each gateway in turn", rolling_restart, nothing)

    tabs = fleet.tabs
    print(
        f"\nchaos: {len(tabs)} tabs over {SESSIONS} sessions, 3 gateways, 2 fetchers, {CHANGES_PER_SECOND} changes/s"
    )
    for name, seconds, _ in figures:
        print(f"  {name:<42} every tab on its final cart {seconds:5.2f} s after the load stopped")
    print(
        f"  {loader.version} changes ({loader.failed_writes} refused by the stopped database), "
        f"{sum(len(t.connects) - 1 for t in tabs)} reconnects, seq went back {sum(map(seq_went_back, tabs))} times, "
        f"lost final states 0"
    )
    assert sum(map(seq_went_back, tabs)) == 0
    for service in fleet.services:
        assert service.process is not None and service.process.poll() is None, f"{service.module} died"
