"""What a Redis Cluster changes: commands per node, idle and per trigger, beside one node.

    .venv/bin/python -m benchmarks.redis_cluster [--sessions 1000] [--rate 200] [--seconds 10]

The same run twice, on one Redis and on a 6-node Cluster (3 primaries) started on loopback
(`services.localtopologies`): 2 gateways and 2 fetchers as processes, one tab per session on each
gateway, then (a) idle with every session held, (b) triggers at `--rate`, (c) one trigger for
every session at once. Commands are counted on every primary (INFO commandstats, script-internal
calls included), so the table shows the load each node takes and how evenly it is spread. Every
script and pipeline of the services touches one slot (`shared/keys.py`): none crosses slots.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import tempfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import redis

from benchmarks import servers
from benchmarks.arguments import positive
from benchmarks.push import Service, metric, open_tabs, paced_triggers, trigger_all, wait_until
from services.localservers import LocalRedis
from services.localtopologies import LocalCluster, redis_version
from shared.keys import SESSION_MESSAGES_CHANNEL


def commands(ports: list[int]) -> dict[int, int]:
    """Commands each node has run so far."""
    totals = {}
    for port in ports:
        stats = redis.Redis(port=port).info("commandstats")
        totals[port] = sum(int(v["calls"]) for v in stats.values())
    return totals


def spent(before: dict[int, int], after: dict[int, int]) -> list[int]:
    return sorted((after[port] - before[port] for port in before), reverse=True)


@contextmanager
def topology(kind: str) -> Iterator[tuple[dict[str, str], list[int], Callable[[], Any]]]:
    """(the services' Redis variables, the primaries' ports, a publisher as PHP's)."""
    if kind == "node":
        server = LocalRedis().start()
        try:
            yield {"REDIS_URL": server.url}, [server.port], lambda: redis.asyncio.Redis(port=server.port)
        finally:
            server.cleanup()
        return
    cluster = LocalCluster().start()
    try:
        primaries = list(cluster.primaries())
        # PUBLISH on any node reaches every node's subscribers: PHP may use a plain connection.
        yield (
            {"REDIS_CLUSTER_NODES": cluster.nodes_setting},
            primaries,
            lambda: redis.asyncio.Redis(port=primaries[-1]),
        )
    finally:
        cluster.cleanup()


async def settled(service: Service) -> None:
    """The shards split between the fetchers (a rebalance resyncs sessions: not idle load)."""

    def split() -> bool:
        held = [
            metric(f"http://127.0.0.1:{port}/metrics", "portico_fetcher_shards_held")
            for port in service.fetcher_ports
        ]
        return all(held) and sum(held) == 64

    if not await wait_until(split, 30):
        raise RuntimeError("the fetchers did not split the shards")
    await asyncio.sleep(1)


async def measure(args: argparse.Namespace, kind: str, database_url: str, logs: Path) -> list[str]:
    sessions = [f"cluster-bench-{i:05d}" for i in range(args.sessions)]
    with topology(kind) as (env, primaries, publisher):
        service = Service("", database_url, logs, True, redis_env=env)
        service.start()
        client = publisher()
        try:

            async def trigger(client: Any, session: str) -> None:
                payload = {"type": "update_partial_applications", "sessionId": session}
                await client.publish(SESSION_MESSAGES_CHANNEL, json.dumps(payload))

            await settled(service)
            tabs = [
                *await open_tabs(service.gateway_url(0), sessions),
                *await open_tabs(service.gateway_url(1), sessions),
            ]
            if not await wait_until(lambda: all(t.carts for t in tabs), 60):
                raise RuntimeError("tabs without a join-time cart")
            await asyncio.sleep(2)
            before = commands(primaries)
            await asyncio.sleep(args.idle_seconds)
            idle = [n / args.idle_seconds * 60 for n in spent(before, commands(primaries))]

            since = {id(t): len(t.carts) for t in tabs}
            before = commands(primaries)
            sent = await paced_triggers(client, sessions, args.rate, args.seconds, trigger)
            count = sum(len(v) for v in sent.values())
            await wait_until(
                lambda: all(len(t.carts) - since[id(t)] >= len(sent[t.session]) for t in tabs), 15
            )
            paced = [n / count for n in spent(before, commands(primaries))]

            since = {id(t): len(t.carts) for t in tabs}
            before = commands(primaries)
            await trigger_all(client, sessions)
            await wait_until(lambda: all(len(t.carts) > since[id(t)] for t in tabs), 30)
            await asyncio.sleep(0.5)
            burst = [n / len(sessions) for n in spent(before, commands(primaries))]
            for tab in tabs:
                await tab.close()
        finally:
            await client.aclose()
            service.stop()

    def row(what: str, per_node: list[float], unit: str) -> str:
        nodes = " / ".join(f"{n:,.1f}" for n in per_node)
        return f"| {kind} | {what} | {sum(per_node):,.1f} {unit} | {nodes} |"

    return [
        row(f"idle, {len(sessions)} sessions held on 2 gateways", idle, "/min"),
        row(f"{args.rate:.0f} triggers/s", paced, "per trigger"),
        row(f"{len(sessions)} triggers at once", burst, "per trigger"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sessions", type=positive(int), default=1000)
    parser.add_argument("--rate", type=positive(float), default=200)
    parser.add_argument("--seconds", type=positive(float), default=10)
    parser.add_argument("--idle-seconds", type=positive(float), default=30)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # two tabs per session, here
    if redis_version() < (7,):
        print("redis-server older than 7 (no sharded pub/sub): no Cluster to measure")
        return
    with ExitStack() as cleanup:
        database_url = servers.database_url(cleanup)
        asyncio.run(seed(database_url, args.sessions))
        logs = Path(cleanup.enter_context(tempfile.TemporaryDirectory(prefix="portico-bench-")))
        rows = asyncio.run(measure(args, "node", database_url, logs))
        rows += asyncio.run(measure(args, "cluster", database_url, logs))
    print("\nRedis commands, by primary (busiest first):\n")
    print("| Redis | load | in all | per primary |")
    print("|---|---|---|---|")
    print("\n".join(rows))


async def seed(database_url: str, sessions: int) -> None:
    db = await asyncpg.connect(database_url)
    try:
        await db.execute("DELETE FROM bb_application WHERE session_id LIKE 'cluster-bench-%'")
        await db.execute(
            """INSERT INTO bb_application (session_id, status, modified, activity_id, contact_name,
                 contact_email, contact_phone, secret, owner_id, name)
               SELECT 'cluster-bench-' || lpad(i::text, 5, '0'), 'NEWPARTIAL1', '2025-05-12 11:54:20', 1,
                      'Kari', 'kari@example.no', '12345678', 's3cret', 0, 'Søknad ' || i
                 FROM generate_series(0, $1 - 1) i""",
            sessions,
        )
    finally:
        await db.close()


if __name__ == "__main__":
    main()
