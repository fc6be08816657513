"""Chaos in Redis itself: Sentinel and Cluster failovers and a reshard, under the versioned-cart load.

The fleet of `tests/support/chaos.py` (3 gateway and 2 fetcher processes, 120 reconnecting tabs,
40 cart changes a second published as PHP does) runs against a Sentinel set (master, replica,
3 sentinels) or a 6-node Cluster that the test starts on loopback. Faults:

  * Sentinel: the master SIGKILLed (the replica is promoted), then a graceful
    `SENTINEL FAILOVER` (two masters for a while: the old one accepts writes until demoted);
  * Cluster: the primary that holds the PHP backend's channels' slot SIGKILLed (its replica
    takes over), then the slots of every channel and key the services use moved to other
    primaries while the load runs.

After each, counted from the moment the topology settled (the new master promoted; for the
graceful failover, the old one demoted; the cluster `ok` again; the last slot moved): every
service is ready again within `READY_BOUND`, a trigger published then reaches all its tabs within
`PUSH_BOUND` (nobody deaf), and every tab shows its session's final cart within
`CONVERGENCE_BOUND` of the end of the load; `seq` never goes back, no process dies. The figures
are printed (`make chaos`) and quoted in the README.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator

import pytest

from services.localservers import LocalPostgres
from services.localtopologies import MASTER_NAME, LocalCluster, SentinelSet
from shared.keys import SESSION_MESSAGES_CHANNEL, Keys
from shared.redis_topology import KEY_GROUPS
from shared.settings import RedisSettings
from tests.conftest import require_redis_7
from tests.support.chaos import Fleet, running_fleet, seq_went_back

pytestmark = [pytest.mark.anyio, pytest.mark.chaos, pytest.mark.slow]

READY_BOUND = 20.0  # seconds from the settled topology to every service ready
PUSH_BOUND = 2.0  # seconds from a trigger after the fault to every tab of its session


@pytest.fixture
def postgres() -> Iterator[LocalPostgres]:
    server = LocalPostgres().start()
    try:
        yield server
    finally:
        server.cleanup()


Step = Callable[[], Awaitable[None]]


async def nothing() -> None:
    pass


async def run_faults(
    fleet: Fleet, topology: str, faults: list[tuple[str, Step, Step]], describe: Callable[[], str]
) -> None:
    """Each fault: under the load, `inject` (returns once the topology has settled), measure,
    then `heal` (a killed node back, as a replica) before the next one."""
    loader = fleet.loader
    lines = []
    for name, inject, heal in faults:
        stop = asyncio.Event()
        load = asyncio.create_task(loader.run_until(stop))
        await asyncio.sleep(1.0)
        await inject()  # under the load; returns once the topology has settled
        settled = time.monotonic()
        try:
            ready = await fleet.all_ready(READY_BOUND)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}\n{describe()}") from None
        await asyncio.sleep(max(0.5, 2.0 - (time.monotonic() - settled)))
        stop.set()
        await load
        converged = await fleet.converge(name)
        reached = await fleet.push_reaches_all()
        await heal()
        lines.append(
            f"  {name:<44} ready {ready:5.2f} s after it settled; every tab on its final cart "
            f"{converged:5.2f} s after the load; a trigger then reached all in {reached:.2f} s"
        )
        assert reached <= PUSH_BOUND, f"{name}: the trigger after took {reached:.2f} s"
    print(f"\nchaos in Redis ({topology}): {len(fleet.tabs)} tabs, 3 gateways, 2 fetchers, 40 changes/s")
    print("\n".join(lines))
    back = sum(map(seq_went_back, fleet.tabs))
    print(
        f"  {loader.version} changes, {loader.failed_publishes} triggers not published (Redis failing over), "
        f"{sum(len(t.connects) - 1 for t in fleet.tabs)} reconnects, seq went back {back} times, lost final states 0"
    )
    assert back == 0
    for service in fleet.services:
        assert service.process is not None and service.process.poll() is None, f"{service.module} died"


async def test_every_tab_converges_through_sentinel_failovers(postgres: LocalPostgres):
    sentinels = await asyncio.to_thread(SentinelSet().start)
    try:
        env = {"REDIS_SENTINELS": sentinels.sentinels_setting, "REDIS_SENTINEL_MASTER": MASTER_NAME}
        settings = RedisSettings(
            url="",
            prefix="chaos:",
            mode="sentinel",
            sentinels=tuple(("127.0.0.1", s.port) for s in sentinels.sentinels),
            sentinel_master=MASTER_NAME,
        )
        async with running_fleet(env, settings, postgres.url) as fleet:
            killed: list[int] = []

            async def kill_master() -> None:
                old, _new = await asyncio.to_thread(sentinels.kill_master)  # returns once promoted
                killed.append(old)

            async def restart_old_master() -> None:  # back as a replica of the new master
                await asyncio.to_thread(sentinels.restart, killed[-1])

            async def graceful_failover() -> None:
                await asyncio.to_thread(sentinels.failover)  # returns once the old master is demoted

            await run_faults(
                fleet,
                "Sentinel",
                describe=lambda: f"master: {sentinels.master_port()}",
                faults=[
                    ("Sentinel: master SIGKILL, replica promoted", kill_master, restart_old_master),
                    ("Sentinel: graceful SENTINEL FAILOVER", graceful_failover, nothing),
                ],
            )
    finally:
        sentinels.cleanup()


async def test_every_tab_converges_through_cluster_failovers(postgres: LocalPostgres):
    require_redis_7()
    cluster = await asyncio.to_thread(LocalCluster().start)
    try:
        env = {"REDIS_CLUSTER_NODES": cluster.nodes_setting}
        settings = RedisSettings(
            url="",
            prefix="chaos:",
            mode="cluster",
            cluster_nodes=tuple(("127.0.0.1", n.port) for n in cluster.nodes),
        )
        async with running_fleet(env, settings, postgres.url) as fleet:
            killed: list[int] = []

            async def kill_primary() -> None:
                # The primary the fetchers' plain subscriptions are on: the worst one to lose.
                slot = cluster.slot_of(SESSION_MESSAGES_CHANNEL)
                old, _new = await asyncio.to_thread(cluster.kill_primary_of, slot)  # returns once taken over
                killed.append(old)

            async def restart_old_primary() -> None:  # back as a replica
                await asyncio.to_thread(cluster.restart, killed[-1])

            async def reshard() -> None:
                keys = Keys("chaos:", KEY_GROUPS)
                names = [
                    *(keys.gateway_channel(f"chaos-gw{n}") for n in (1, 2, 3)),
                    keys.gateways_channel,
                    keys.fetcher_requests_channel,
                    keys.fetchers,
                    *(keys.gateways_alive(group) for group in range(0, KEY_GROUPS, 3)),
                ]
                slots = sorted({cluster.slot_of(name) for name in names})

                def move() -> None:
                    primaries = list(cluster.primaries())
                    for n, slot in enumerate(slots):
                        owner = cluster.agreed_owner(slot)
                        others = [p for p in primaries if p != owner]
                        cluster.migrate_slot(slot, others[n % len(others)])

                await asyncio.to_thread(move)

            await run_faults(
                fleet,
                "Cluster",
                describe=cluster.describe,
                faults=[
                    ("Cluster: primary SIGKILL, replica takes over", kill_primary, restart_old_primary),
                    ("Cluster: 12 slots resharded under load", reshard, nothing),
                ],
            )
    finally:
        cluster.cleanup()
