"""Redis as production runs it, on loopback, for the tests and benchmarks: a Sentinel set and a Cluster.

`SentinelSet`: a master, a replica and three sentinels watching them (quorum 2), fast timers so
a failover takes seconds. `LocalCluster`: six nodes, three primaries with one replica each,
formed with CLUSTER commands (no `redis-cli` needed), and a slot migration done the way
`redis-cli --cluster reshard` does it. Both from the machine's `redis-server`
(`services.localservers`); sharded pub/sub needs Redis 7 (`redis_version`).
"""

from __future__ import annotations

import random
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import redis

from services.localservers import LocalRedis, find_redis_server, free_port, wait_port

MASTER_NAME = "portico"
CLUSTER_SLOTS = 16384


def redis_version() -> tuple[int, ...]:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True).stdout
    version = out.split("v=", 1)[1].split()[0]
    return tuple(int(part) for part in version.split("."))


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = predicate()
        except (redis.RedisError, OSError):
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def client(port: int) -> Any:
    """A plain client to one node (redis-py's sync commands are typed loosely: Any)."""
    return redis.Redis(port=port, socket_timeout=5, socket_connect_timeout=2)


class Sentinel:
    """One `redis-server --sentinel` process; its config file is its own (Sentinel rewrites it)."""

    def __init__(self, master_port: int, *, down_after_ms: int, failover_timeout_ms: int) -> None:
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="portico-sentinel-")
        self.config = Path(self.dir, "sentinel.conf")
        self.config.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n"
            f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} 2\n"
            f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
            f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}\n"
            f"sentinel parallel-syncs {MASTER_NAME} 1\n"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Sentinel:
        self._proc = subprocess.Popen(
            [find_redis_server(), str(self.config), "--sentinel", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        wait_port(self.port, 10, "redis sentinel")
        return self

    def cleanup(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        subprocess.run(["rm", "-rf", self.dir], check=False)


class SentinelSet:
    """A master, one replica and three sentinels (quorum 2) on loopback."""

    def __init__(self, *, down_after_ms: int = 1000, failover_timeout_ms: int = 10000) -> None:
        self.master = LocalRedis()
        self.replica = LocalRedis(extra_args=("--replicaof", "127.0.0.1", str(self.master.port)))
        self.sentinels = [
            Sentinel(self.master.port, down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms)
            for _ in range(3)
        ]

    @property
    def nodes(self) -> list[LocalRedis]:
        return [self.master, self.replica]

    @property
    def sentinels_setting(self) -> str:
        """The value of REDIS_SENTINELS."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def start(self) -> SentinelSet:
        self.master.start()
        self.replica.start()
        wait_for(
            lambda: client(self.replica.port).info("replication").get("master_link_status") == "up",
            20,
            "the replica in sync",
        )
        for sentinel in self.sentinels:
            sentinel.start()
        # Every sentinel knows the replica and the other sentinels: a failover can happen.
        wait_for(
            lambda: all(
                int(client(s.port).sentinel_master(MASTER_NAME)["num-other-sentinels"]) == 2
                and int(client(s.port).sentinel_master(MASTER_NAME)["num-slaves"]) == 1
                for s in self.sentinels
            ),
            30,
            "the sentinels to find each other and the replica",
        )
        return self

    def master_port(self) -> int:
        _host, port = client(self.sentinels[0].port).sentinel_get_master_addr_by_name(MASTER_NAME)
        return int(port)

    def node(self, port: int) -> LocalRedis:
        return next(n for n in self.nodes if n.port == port)

    def role(self, port: int) -> str:
        return str(client(port).info("replication")["role"])

    def failover(self, timeout: float = 30) -> tuple[int, int]:
        """A graceful `SENTINEL FAILOVER`. Returns (old master, new master) once the old master
        is demoted (a replica of the new one): the topology has settled."""
        old = self.master_port()
        client(self.sentinels[0].port).execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        new = wait_for(lambda: (p := self.master_port()) != old and p, timeout, "Sentinel to switch masters")
        self.wait_settled(old, new, timeout)
        return old, new

    def kill_master(self, timeout: float = 30) -> tuple[int, int]:
        """SIGKILL the master; returns (old, new) once Sentinel promoted the replica (the old one
        is not restarted here: `restart`)."""
        old = self.master_port()
        self.node(old).kill()
        new = wait_for(
            lambda: (p := self.master_port()) != old and p, timeout, "Sentinel to promote the replica"
        )
        wait_for(lambda: self.role(new) == "master", timeout, "the new master to take writes")
        return old, new

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start a killed node again; Sentinel makes it a replica of the current master."""
        self.node(port).start()
        new = self.master_port()
        self.wait_settled(port, new, timeout)

    def wait_settled(self, old: int, new: int, timeout: float) -> None:
        def demoted() -> bool:
            info = client(old).info("replication")
            return info["role"] == "slave" and int(info["master_port"]) == new

        wait_for(demoted, timeout, f"the old master {old} demoted to a replica of {new}")

    def cleanup(self) -> None:
        for sentinel in self.sentinels:
            sentinel.cleanup()
        for node in self.nodes:
            node.cleanup()


def cluster_port() -> int:
    """A free port whose cluster bus port (+10000) is free and valid too (an ephemeral port
    above 55535 has none: the node would not start)."""
    while True:
        port = random.randint(20000, 45000)
        try:
            for candidate in (port, port + 10000):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", candidate))
        except OSError:
            continue
        return port


def _replicate(port: int, primary_id: str) -> Any:
    return client(port).execute_command("CLUSTER", "REPLICATE", primary_id)


def _in_sync(port: int) -> bool:
    return bool(client(port).info("replication").get("master_link_status") == "up")


class LocalCluster:
    """Six nodes: three primaries, each with a replica, the slots split evenly."""

    def __init__(self, *, node_timeout_ms: int = 2000) -> None:
        self.nodes = [
            LocalRedis(
                cluster_port(),
                extra_args=(
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    str(node_timeout_ms),
                    # A replica that lost touch for a while may still fail over (tests kill fast).
                    "--cluster-replica-validity-factor",
                    "0",
                ),
            )
            for _ in range(6)
        ]

    @property
    def nodes_setting(self) -> str:
        """The value of REDIS_CLUSTER_NODES (every node: any of them is a seed)."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> LocalCluster:
        for node in self.nodes:
            node.start()
        primaries, replicas = self.nodes[:3], self.nodes[3:]
        step = CLUSTER_SLOTS // 3
        for i, node in enumerate(primaries):
            last = CLUSTER_SLOTS - 1 if i == 2 else (i + 1) * step - 1
            client(node.port).execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
        first = client(self.nodes[0].port)
        for node in self.nodes[1:]:
            first.execute_command("CLUSTER", "MEET", "127.0.0.1", node.port)
        wait_for(
            lambda: all(len(self._known(n.port)) == 6 for n in self.nodes),
            20,
            "every node to know the others",
        )
        for primary, replica in zip(primaries, replicas, strict=True):
            primary_id = self.node_id(primary.port)
            wait_for(partial(_replicate, replica.port, primary_id), 20, "a replica to attach")
        self.wait_ok()
        for replica in replicas:
            wait_for(partial(_in_sync, replica.port), 20, "the replicas in sync")
        return self

    def _known(self, port: int) -> list[str]:
        raw = client(port).execute_command("CLUSTER", "NODES")
        text = raw.decode() if isinstance(raw, bytes) else str(raw)
        return [
            line for line in text.splitlines() if line and "handshake" not in line and "noaddr" not in line
        ]

    def node_id(self, port: int) -> str:
        return str(client(port).execute_command("CLUSTER", "MYID").decode())

    def primaries(self) -> dict[int, list[tuple[int, int]]]:
        """Port of each live primary -> its slot ranges, as the live nodes see it."""
        for node in self.nodes:
            if not node.running:
                continue
            try:
                shards = client(node.port).execute_command("CLUSTER", "SLOTS")
            except redis.RedisError:
                continue
            found: dict[int, list[tuple[int, int]]] = {}
            for start, end, primary, *_ in shards:
                found.setdefault(int(primary[1]), []).append((int(start), int(end)))
            return found
        raise AssertionError("no cluster node answers")

    def primary_of_slot(self, slot: int) -> int:
        for port, ranges in self.primaries().items():
            if any(start <= slot <= end for start, end in ranges):
                return port
        raise AssertionError(f"slot {slot} has no primary")

    def wait_ok(self, timeout: float = 30) -> None:
        def ok() -> bool:
            return all(
                client(n.port).execute_command("CLUSTER", "INFO").decode().count("cluster_state:ok")
                for n in self.nodes
                if n.running
            )

        wait_for(ok, timeout, "cluster_state:ok on every live node")

    def kill_primary_of(self, slot: int, timeout: float = 30) -> tuple[int, int]:
        """SIGKILL the primary holding `slot`; returns (old, new) once its replica took over."""
        old = self.primary_of_slot(slot)
        node = next(n for n in self.nodes if n.port == old)
        node.kill()
        new = wait_for(
            lambda: (p := self.primary_of_slot(slot)) != old and p, timeout, f"a replica to take slot {slot}"
        )
        self.wait_ok(timeout)
        return old, new

    def restart(self, port: int, timeout: float = 30) -> None:
        """Start a killed node again (it rejoins as a replica of the node that replaced it)."""
        next(n for n in self.nodes if n.port == port).start()
        wait_for(lambda: client(port).info("replication")["role"] == "slave", timeout, "the node to rejoin")
        self.wait_ok(timeout)

    def agreed_owner(self, slot: int, timeout: float = 20) -> int:
        """The primary every live node names for `slot`, once they all name the same one (a node
        that rejoined, or a migration just done, may lag behind for a moment)."""

        def agreed() -> int | None:
            owners = set()
            for node in self.nodes:
                if not node.running:
                    continue
                for start, end, primary, *_ in client(node.port).execute_command("CLUSTER", "SLOTS"):
                    if int(start) <= slot <= int(end):
                        owners.add(int(primary[1]))
            return owners.pop() if len(owners) == 1 else None

        return int(wait_for(agreed, timeout, f"every node to agree on the owner of slot {slot}"))

    def migrate_slot(self, slot: int, to_port: int) -> None:
        """Move one slot and its keys to another primary, the way `redis-cli --cluster reshard`
        does: IMPORTING/MIGRATING, MIGRATE the keys, then SETSLOT NODE on every primary; returns
        once every node agrees. (Taking the owner from one node's view, which lagged, once left
        two primaries each naming the other for a slot.)"""
        source_port = self.agreed_owner(slot)
        if source_port == to_port:
            return
        source, target = client(source_port), client(to_port)
        source_id, target_id = self.node_id(source_port), self.node_id(to_port)
        target.execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.execute_command("MIGRATE", "127.0.0.1", to_port, "", 0, 5000, "KEYS", *keys)
        for port in (to_port, source_port, *self.primaries()):
            client(port).execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_for(lambda: self.agreed_owner(slot) == to_port, 20, f"slot {slot} on {to_port} everywhere")

    def describe(self) -> str:
        """Each live node's role, and who it says owns which slots (for a failure's message)."""
        lines = []
        for node in self.nodes:
            if not node.running:
                lines.append(f"{node.port}: down")
                continue
            try:
                info = client(node.port).info("replication")["role"]
                slots = client(node.port).execute_command("CLUSTER", "SLOTS")
                owners = ",".join(f"{a}-{b}@{p[1]}" for a, b, p, *_ in sorted(slots))
                lines.append(f"{node.port} {info}: {owners}")
            except redis.RedisError as exc:
                lines.append(f"{node.port}: {exc}")
        return "\n".join(lines)

    def slot_of(self, key: str) -> int:
        return int(client(self.nodes[0].port).execute_command("CLUSTER", "KEYSLOT", key))

    def cleanup(self) -> None:
        for node in self.nodes:
            node.cleanup()
