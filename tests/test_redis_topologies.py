"""Redis as production runs it: the whole contract through a Sentinel set and through a Cluster.

Each test starts real topologies on loopback from the machine's `redis-server`
(`tests/support/redis_topologies.py`), and real gateways and fetchers configured with
`REDIS_SENTINELS` or `REDIS_CLUSTER_NODES`. The faults under load (failovers, a reshard) are in
`test_chaos_redis.py`; here: that everything works at all, and the two ways a subscriber goes
wrong without an error (a moved slot, a demoted master).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace

import pytest

from services.localservers import LocalRedis
from services.localtopologies import MASTER_NAME, LocalCluster, SentinelSet, client
from shared.keys import NOTIFICATIONS_CHANNEL, SESSION_MESSAGES_CHANNEL, Keys
from shared.protocol import session_hash
from shared.redis_topology import KEY_GROUPS, RedisTopology
from shared.settings import RedisSettings
from tests.conftest import require_redis_7
from tests.support.data import add_application, seed_reference
from tests.support.metrics import metric_value
from tests.support.stack import Stack, a_change_reaches_every_gateway, running_stack, trigger
from tests.support.tabs import Tab
from tests.support.tcpproxy import TcpProxy
from tests.support.waiting import eventually

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


def cluster_settings(cluster: LocalCluster, prefix: str) -> RedisSettings:
    nodes = tuple(("127.0.0.1", node.port) for node in cluster.nodes)
    return RedisSettings(url="", prefix=prefix, mode="cluster", cluster_nodes=nodes)


def sentinel_settings(sentinels: SentinelSet, prefix: str) -> RedisSettings:
    addresses = tuple(("127.0.0.1", s.port) for s in sentinels.sentinels)
    return RedisSettings(
        url="", prefix=prefix, mode="sentinel", sentinels=addresses, sentinel_master=MASTER_NAME
    )


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    require_redis_7()
    started = LocalCluster().start()
    try:
        yield started
    finally:
        started.cleanup()


@pytest.fixture
def sentinels() -> Iterator[SentinelSet]:
    started = SentinelSet().start()
    try:
        yield started
    finally:
        started.cleanup()


@pytest.fixture
async def cluster_stack(cluster: LocalCluster, database_url: str, prefix: str, db) -> AsyncIterator[Stack]:
    await seed_reference(db)
    async with running_stack("", database_url, prefix, topology=cluster_settings(cluster, prefix)) as stack:
        yield stack


async def publish_plain(settings: RedisSettings, channel: str, payload: dict) -> None:
    """As the PHP backend publishes: plain PUBLISH, to whatever node the client picks."""
    topology = RedisTopology(settings)
    command = topology.command_client(max_connections=2)
    try:
        await command.publish(channel, json.dumps(payload))
    finally:
        await command.aclose()
        await topology.aclose()


async def test_the_whole_contract_through_a_cluster(cluster: LocalCluster, cluster_stack: Stack, db):
    """Carts, relays between gateways and room events work on a 6-node Cluster: every script
    and pipeline stays in one slot (hash-tagged keys: without them the fetcher's batch script
    failed with CROSSSLOT), the services' own channels are sharded, the PHP backend's are plain."""
    stack = cluster_stack
    settings = stack.redis_settings()
    sid = "clusterSession00001"
    tabs = await a_change_reaches_every_gateway(stack, db, settings, sid)
    # A relay crosses gateways through another gateway's sharded channel.
    await tabs[0].send({"type": "session_message", "message": "opened elsewhere"})
    [relayed] = await tabs[1].wait_for("room_message")
    assert relayed["message"] == "opened elsewhere"
    # A room event: the PHP backend's plain channel, through the fetchers.
    await tabs[1].send({"type": "subscribe", "entityType": "resource", "entityId": 7})
    await tabs[1].wait_for("room_joined")
    event = {"target": "entity", "entityType": "resource", "entityId": 7, "eventType": "booked"}
    await publish_plain(settings, NOTIFICATIONS_CHANNEL, event)
    [received] = await tabs[1].wait_for("entity_event")
    assert received["eventType"] == "booked" and received["roomId"] == "entity_resource_7"

    keys = Keys(stack.prefix, KEY_GROUPS)
    group = keys.group_of(session_hash(sid))
    tag_slot = cluster.slot_of(f"{{g{group}}}")
    for key in (
        keys.route_owners(session_hash(sid)),
        keys.session_seq(session_hash(sid)),
        keys.gateways_alive(group),
    ):
        assert cluster.slot_of(key) == tag_slot, key
    primaries = list(cluster.primaries())
    sharded = {
        c.decode() for port in primaries for c in client(port).execute_command("PUBSUB", "SHARDCHANNELS")
    }
    plain = {c.decode() for port in primaries for c in client(port).execute_command("PUBSUB", "CHANNELS")}
    own = {keys.gateway_channel(g.gateway.id) for g in stack.gateways} | {
        keys.gateways_channel,
        keys.fetcher_requests_channel,
    }
    assert own <= sharded and not own & plain
    assert {SESSION_MESSAGES_CHANNEL, NOTIFICATIONS_CHANNEL, keys.handover_channel} <= plain
    assert all(g.gateway.ready for g in stack.gateways) and all(f.ready for f in stack.fetchers)


async def test_a_gateway_follows_its_channel_when_the_slot_moves(
    cluster: LocalCluster, cluster_stack: Stack, db
):
    """Redis 7 tells a sharded subscriber its slot moved with a `sunsubscribe`, and from then
    on the messages of that channel go to the slot's new owner. redis-py's own Cluster pub/sub
    lost 1 message of 100 in a migration; ours reconnects at once to the new owner, asks for
    fresh carts, and the next push arrives."""
    stack = cluster_stack
    settings = stack.redis_settings()
    gateway = stack.gateways[0].gateway
    sid = "clusterSession00002"
    await add_application(db, sid)
    tab = await Tab.open(stack.gateways[0].url, session=sid)
    await tab.wait_pushes(1)
    channel = gateway.keys.gateway_channel(gateway.id)
    slot = cluster.slot_of(channel)
    before = gateway.subscription.reconnects
    target = next(port for port in cluster.primaries() if port != cluster.primary_of_slot(slot))
    cluster.migrate_slot(slot, target)
    await eventually(lambda: gateway.subscription.reconnects > before, 10, what="resubscribed")
    await eventually(lambda: gateway.ready, 10, what="ready again")
    await add_application(db, sid)
    started = time.monotonic()
    await trigger(settings, sid)
    pushes = await tab.wait_pushes(3, timeout=10)  # the resync's push, then the trigger's
    assert pushes[-1]["data"]["count"] == 2
    print(f"\nslot moved: the next push reached the tab {time.monotonic() - started:.2f} s after its trigger")
    assert time.monotonic() - started < 2.0


async def test_the_whole_contract_through_sentinel(
    sentinels: SentinelSet, database_url: str, prefix: str, db
):
    await seed_reference(db)
    settings = sentinel_settings(sentinels, prefix)
    async with running_stack("", database_url, prefix, topology=settings) as stack:
        tabs = await a_change_reaches_every_gateway(stack, db, settings, "sentinelSession0001")
        await tabs[0].send({"type": "session_message", "message": "opened elsewhere"})
        await tabs[1].wait_for("room_message")
        # Everything went to the master Sentinel names, nothing to the replica.
        assert client(sentinels.replica.port).dbsize() == client(sentinels.master.port).dbsize() > 0
        assert client(sentinels.replica.port).pubsub_numsub(SESSION_MESSAGES_CHANNEL)[0][1] == 0


async def test_a_deaf_subscriber_is_found_by_its_delivery_probe(database_url: str, prefix: str, db):
    """The deaf subscriber (centrifugo#1189): a subscription that stays connected and answers
    pings, on a node where nothing is published any more. Centrifugo's stayed on the old master
    after a failover. Here REDIS_URL is one endpoint (as a managed Redis gives) that fails over
    to the replica while the old primary stays up, cut off from the new one (a partition): it
    keeps its clients, and the endpoint sends new connections to the new primary, as the PHP
    backend's publishes. The subscriptions stayed on the old node and heard none of them. The
    delivery probe (published on a new connection, where publishes go now) finds each within
    seconds: readiness turns false, they and the command pools connect again, the gateway asks
    for fresh carts, and the next push arrives."""
    await seed_reference(db)
    old = LocalRedis().start()
    new = LocalRedis(extra_args=("--replicaof", "127.0.0.1", str(old.port))).start()
    endpoint = await TcpProxy(old.port).start()
    stack = Stack(f"redis://127.0.0.1:{endpoint.port}/0", database_url, prefix)
    try:
        await eventually(lambda: client(new.port).info("replication")["master_link_status"] == "up", 10)
        await stack.add_fetcher()
        await stack.add_gateway()
        await stack.wait_shards_settled()
        gateway, fetcher = stack.gateways[0].gateway, stack.fetchers[0]
        sid = "deafSession00000001"
        await add_application(db, sid)
        tab = await Tab.open(stack.gateways[0].url, session=sid)
        await tab.wait_pushes(1)
        seen: list[bool] = []
        watching = asyncio.create_task(_watch(lambda: gateway.ready and fetcher.ready, seen))
        # The endpoint's failover: the replica promoted, the old primary cut off but up.
        client(new.port).execute_command("REPLICAOF", "NO", "ONE")
        endpoint.target_port = new.port
        switched = time.monotonic()
        await eventually(
            lambda: gateway.subscription.deaf_detected and fetcher.subscription.deaf_detected,
            20,
            what="both subscriptions found deaf",
        )
        await eventually(lambda: gateway.ready and fetcher.ready, 20, what="ready again")
        recovered = time.monotonic() - switched
        watching.cancel()
        assert False in seen, "not ready while deaf"
        assert metric_value(gateway.metrics.redis_deaf) >= 1 and metric_value(fetcher.metrics.redis_deaf) >= 1
        channel = gateway.keys.gateway_channel(gateway.id)
        assert client(new.port).pubsub_numsub(channel)[0][1] == 1
        assert client(old.port).pubsub_numsub(channel)[0][1] == 0
        await add_application(db, sid)
        started = time.monotonic()
        await trigger(stack.redis_url, sid)
        await eventually(lambda: tab.pushes()[-1]["data"]["count"] == 2, 5, what="the push after")
        reached = time.monotonic() - started
        print(
            f"\ndeaf subscriptions found, and ready again, {recovered:.1f} s after the switch; next push {reached:.2f} s"
        )
        assert reached < 2.0
    finally:
        await stack.close()
        await endpoint.cut()
        old.cleanup()
        new.cleanup()


async def _watch(predicate, seen: list[bool]) -> None:
    while True:
        seen.append(bool(predicate()))
        await asyncio.sleep(0.05)


def test_cluster_settings_tag_keys_and_sentinel_settings_do_not():
    """One node and Sentinel keep today's key names (an upgrade changes nothing); only a Cluster
    tags them, so that every multi-key script stays in one slot."""
    plain, tagged = Keys("p:"), Keys("p:", KEY_GROUPS)
    session = session_hash("anything")
    assert plain.route_owners(session) == f"p:session:{session}:owners"
    assert plain.gateways_alive() == "p:gateways:alive" and plain.alive_sets == ["p:gateways:alive"]
    group = tagged.group_of(session)
    assert tagged.route_owners(session) == f"p:{{g{group}}}session:{session}:owners"
    assert len(tagged.alive_sets) == KEY_GROUPS
    assert tagged.shard_lease(3).startswith("p:{fetchers}") and tagged.fetchers_shards.startswith(
        "p:{fetchers}"
    )
    assert RedisTopology(replace(RedisSettings("redis://x", "p:"))).key_groups == 0
