"""Which Redis this is (one node, a master found through Sentinel, or a Cluster), and the clients each needs.

`RedisTopology` is built once per process from `RedisSettings` (`REDIS_URL`, `REDIS_SENTINELS`
or `REDIS_CLUSTER_NODES`). It gives:

* the **command client** (scripts, pipelines, publishes), on a pool that waits for a free
  connection, with a short timeout on every call (without one, a publish to a dead slot hung
  60 s) and a few quick retries on connection errors;
* a **subscriber client** for one subscription, resolved again at every (re)connect: the node
  of `REDIS_URL`; the master Sentinel names now; in a Cluster the primary of the channel's slot
  (for a sharded channel, the only node that has its messages; for the PHP backend's plain
  channels, which a Cluster forwards to every node, the same node for every process, so that
  all fetchers see one order of messages: `services/fetcher/handover.py` relies on it);
* `publish` for the services' own channels: SPUBLISH in a Cluster (sharded pub/sub: a message
  goes to the nodes of one shard, not to every node), PUBLISH elsewhere. The PHP backend's
  channels stay plain PUBLISH everywhere;
* the number of **key groups** keys are hash-tagged into in a Cluster (`shared.keys`);
* its background loops (`loops`): in Sentinel mode the sentinels' `+switch-master` notices. On a
  switch the command pools are dropped (their next command finds the new master) and every
  subscription reconnects. A graceful `SENTINEL FAILOVER` leaves the old master accepting
  writes until Sentinel demotes it (about 10 s): following connection errors alone, a
  subscriber stayed on the demoted node, deaf (the subscriptions' delivery probe catches what a
  notice does not, e.g. a sentinel that is down). In every mode a **command check** PINGs what
  the commands use (every primary, in a Cluster) so that readiness says commands answer, not
  only that a subscription is up.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster
from redis.asyncio.connection import BlockingConnectionPool
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.connection import SSLConnection, parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.redis_clients import create_client, parser_options
from shared.resp import DirectCommands, RedisAddress
from shared.settings import RedisSettings

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 5.0  # seconds one command may take before it fails (and is retried)
CONNECT_TIMEOUT = 5.0
COMMAND_CHECK_SECONDS = 2.0  # how often the command check runs; twice that without an answer: not ready
# Cluster: keys are hash-tagged into this many groups (`shared.keys`), spread over the slots;
# a fetch batch makes one script call per group it touches.
KEY_GROUPS = 16
Loop = tuple[str, Coroutine[Any, Any, None]]


class SentinelBlockingConnectionPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master-following pool that *waits* for a free connection, as the single-node
    pool does (`shared.redis_clients.create_client`), instead of failing a burst."""


# What redis-py 8.1's asyncio Cluster client raises when a slot map refresh closes a connection
# that a concurrent command is using (see `_Cluster`).
_TORN_DOWN = (AttributeError, RuntimeError)


class _ClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True) -> list[Any]:
        try:
            return await super().execute(raise_on_error, allow_redirections)
        except _TORN_DOWN as exc:
            raise RedisConnectionError(f"connection reset by a slot map refresh ({exc})") from exc


class _Cluster(RedisCluster):
    """redis-py 8.1's asyncio Cluster client with one defect contained: a command that races the
    client's (re)initialisation (concurrent first calls; a slot map refresh after a failover)
    fails with an AttributeError or a RuntimeError ("the handler is closed") on a connection
    torn down beneath it (seen here: 1 in 16 concurrent first calls; after a primary's death,
    in the chaos suite; each killed the loop that made the call). Reported as the connection
    error it is, so that callers retry it like any other."""

    async def execute_command(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().execute_command(*args, **kwargs)
        except _TORN_DOWN as exc:
            raise RedisConnectionError(f"connection reset by a slot map refresh ({exc})") from exc

    def pipeline(self, transaction: Any | None = None, shard_hint: Any | None = None) -> ClusterPipeline:
        return _ClusterPipeline(self, transaction)  # type: ignore[abstract]


def _seeds(nodes: tuple[tuple[str, int], ...]) -> list[ClusterNode]:
    return [ClusterNode(host, port) for host, port in nodes]


class RedisTopology:
    def __init__(self, settings: RedisSettings) -> None:
        self.settings = settings
        self.mode = settings.mode
        self._clients: list[Any] = []  # command clients made here (a switch drops their pools)
        self._direct: list[DirectCommands] = []  # and the lean ones
        self._on_switch: list[Callable[[], None]] = []
        self._sentinel: Sentinel | None = None
        self._slot_map: RedisCluster | None = None
        self._checked_at: float | None = None  # monotonic time of the last command check that passed
        if self.mode == "sentinel":
            self._sentinel = Sentinel(  # type: ignore[no-untyped-call]
                list(settings.sentinels),
                sentinel_kwargs={
                    "password": settings.sentinel_password or None,
                    "socket_timeout": COMMAND_TIMEOUT,
                    "socket_connect_timeout": CONNECT_TIMEOUT,
                },
                password=settings.password or None,
            )

    @property
    def sharded(self) -> bool:
        """The services' own channels use sharded pub/sub (a Cluster)."""
        return self.mode == "cluster"

    @property
    def key_groups(self) -> int:
        """How many groups keys are hash-tagged into (0: untagged, outside a Cluster)."""
        return KEY_GROUPS if self.mode == "cluster" else 0

    def describe(self) -> str:
        if self.mode == "sentinel":
            sentinels = ",".join(f"{h}:{p}" for h, p in self.settings.sentinels)
            return f"Sentinel master {self.settings.sentinel_master!r} via {sentinels}"
        if self.mode == "cluster":
            return "Cluster via " + ",".join(f"{h}:{p}" for h, p in self.settings.cluster_nodes)
        return "one node"

    # -- commands --------------------------------------------------------------------------

    def command_client(self, *, max_connections: int = 64, wait_seconds: float = 10.0) -> Any:
        """The client for commands, scripts and publishes (see the module's docstring)."""
        client: Any
        if self.mode == "sentinel":
            assert self._sentinel is not None
            client = self._sentinel.master_for(
                self.settings.sentinel_master,
                connection_pool_class=SentinelBlockingConnectionPool,
                max_connections=max_connections,
                timeout=wait_seconds,
                check_connection=True,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT,
                health_check_interval=10,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 3),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
                **parser_options(),
            )
        elif self.mode == "cluster":
            client = _Cluster(
                startup_nodes=_seeds(self.settings.cluster_nodes),
                password=self.settings.password or None,
                # Per node; a Cluster client has no waiting pool, so a burst needs headroom.
                max_connections=max(256, max_connections),
                require_full_coverage=False,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT,
                # MOVED/ASK and a dead primary: re-read the slots and try again, a few times.
                retry=Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), 5),
                **parser_options(),
            )
        else:
            client = create_client(
                self.settings.url, max_connections=max_connections, wait_seconds=wait_seconds
            )
        self._clients.append(client)
        return client

    async def connect(self) -> None:
        """Read a Cluster's slot map before the first commands (concurrent first calls race the
        client's own initialisation). Redis may be down at start: then the first command does it."""
        for client in self._clients:
            if isinstance(client, RedisCluster):
                try:
                    await client.initialize()
                except (RedisError, OSError) as exc:
                    log.warning("redis cluster not reachable yet (%s)", exc)

    def direct_commands(self) -> DirectCommands | None:
        """A lean command connection for a hot path (`shared.resp`: a script call costs 16 µs
        of CPU there, 76 µs through redis-py), following the master as the command client does.
        None in a Cluster, where redis-py routes each command to its slot."""
        if self.mode == "cluster":
            return None
        direct = DirectCommands(lambda: self.subscriber_address(""), timeout=COMMAND_TIMEOUT)
        self._direct.append(direct)
        return direct

    def publish(self, target: Any, channel: str, message: bytes) -> Any:
        """Publish on one of the services' own channels (a client's coroutine, or queued on a
        pipeline): SPUBLISH in a Cluster."""
        return target.spublish(channel, message) if self.sharded else target.publish(channel, message)

    @property
    def commands_healthy(self) -> bool:
        """The command check passed recently (`loops`)."""
        return (
            self._checked_at is not None
            and time.monotonic() - self._checked_at < 2 * COMMAND_CHECK_SECONDS + 1
        )

    async def _check_commands(self, client: Any) -> None:
        while True:
            try:
                if self.mode == "cluster":
                    await asyncio.wait_for(client.ping(target_nodes=RedisCluster.PRIMARIES), COMMAND_TIMEOUT)
                else:
                    await asyncio.wait_for(client.ping(), COMMAND_TIMEOUT)
                self._checked_at = time.monotonic()
            except (RedisError, OSError, TimeoutError) as exc:
                log.debug("redis command check failed (%s)", exc)
            await asyncio.sleep(COMMAND_CHECK_SECONDS)

    # -- subscriptions ---------------------------------------------------------------------

    async def subscriber_client(self, channel: str) -> aioredis.Redis:
        """A plain client for one subscription's connection, to the node it must be on now
        (`channel` decides which in a Cluster). No socket timeout (the subscription's own
        probes prove the link) and no silent retry (a gap must be seen: the owner resyncs)."""
        options: dict[str, Any] = {
            "socket_connect_timeout": CONNECT_TIMEOUT,
            "socket_timeout": None,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
            **parser_options(),
        }
        if self.mode == "sentinel":
            assert self._sentinel is not None
            host, port = await self._sentinel.discover_master(self.settings.sentinel_master)
            return aioredis.Redis(host=host, port=port, password=self.settings.password or None, **options)
        if self.mode == "cluster":
            node = (await self._slots()).get_node_from_key(channel)  # the primary of its slot
            if node is None:
                raise RedisConnectionError(f"no node holds the slot of {channel!r} now")
            return aioredis.Redis(
                host=node.host, port=int(node.port), password=self.settings.password or None, **options
            )
        return aioredis.Redis.from_url(self.settings.url, **options)

    async def subscriber_address(self, channel: str) -> RedisAddress:
        """Where one subscription's connection goes now (`channel` decides it in a Cluster),
        resolved again at every (re)connect."""
        password = self.settings.password
        if self.mode == "sentinel":
            assert self._sentinel is not None
            host, port = await self._sentinel.discover_master(self.settings.sentinel_master)
            return RedisAddress(str(host), int(port), password=password)
        if self.mode == "cluster":
            node = (await self._slots()).get_node_from_key(channel)  # the primary of its slot
            if node is None:
                raise RedisConnectionError(f"no node holds the slot of {channel!r} now")
            return RedisAddress(node.host, int(node.port), password=password)
        parts = parse_url(self.settings.url)  # type: ignore[no-untyped-call]
        return RedisAddress(
            host=str(parts.get("host", "127.0.0.1")),
            port=int(parts.get("port", 6379)),
            path=str(parts.get("path", "")),
            tls=parts.get("connection_class") is SSLConnection,
            username=str(parts.get("username") or ""),
            password=str(parts.get("password") or ""),
            db=int(parts.get("db") or 0),
        )

    async def publish_probe(self, channel: str, message: bytes, *, sharded: bool) -> None:
        """Publish a subscription's delivery probe on a *new* connection, resolved as a new
        subscriber would be: where publishes go now. (Pooled connections may still reach a
        demoted primary, which takes PUBLISH and hands it to a deaf subscriber there.)"""
        client = await self.subscriber_client(channel)
        try:
            if sharded:
                await client.spublish(channel, message)
            else:
                await client.publish(channel, message)
        finally:
            await client.aclose()

    async def _slots(self) -> RedisCluster:
        """A Cluster client used only to know which node holds which slot, read again at every
        use: a subscription reconnects after its slot moved or its primary died."""
        if self._slot_map is None:
            self._slot_map = RedisCluster(
                startup_nodes=_seeds(self.settings.cluster_nodes),
                password=self.settings.password or None,
                require_full_coverage=False,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=COMMAND_TIMEOUT,
            )
            await self._slot_map.initialize()
        else:
            await self._slot_map.nodes_manager.initialize()
        return self._slot_map

    def on_switch(self, callback: Callable[[], None]) -> None:
        """Call `callback` when Sentinel switches masters (the subscriptions reconnect)."""
        self._on_switch.append(callback)

    def loops(self, command_client: Any) -> list[Loop]:
        """Background loops to run supervised: the command check, and Sentinel's notices."""
        loops: list[Loop] = [("redis-command-check", self._check_commands(command_client))]
        if self.mode == "sentinel":
            loops.append(("sentinel-notices", self._watch_sentinels()))
        return loops

    async def _watch_sentinels(self) -> None:
        """Follow `+switch-master` on the sentinels (one at a time, the next on failure)."""
        failures = 0
        while True:
            host, port = self.settings.sentinels[failures % len(self.settings.sentinels)]
            client = aioredis.Redis(
                host=host,
                port=port,
                password=self.settings.sentinel_password or None,
                socket_connect_timeout=CONNECT_TIMEOUT,
                socket_timeout=None,
                retry=Retry(NoBackoff(), 0),
            )
            pubsub = client.pubsub()
            try:
                await pubsub.subscribe("+switch-master")
                failures = 0
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5.0)
                    if message is None:
                        await asyncio.wait_for(pubsub.ping(), COMMAND_TIMEOUT)
                        continue
                    data = message["data"]
                    text = data.decode() if isinstance(data, bytes) else str(data)
                    if text.split(" ", 1)[0] == self.settings.sentinel_master:
                        log.warning("Sentinel switched masters (%s): reconnecting", text)
                        await self._switched()
            except (RedisError, OSError, TimeoutError) as exc:
                failures += 1
                log.warning("sentinel %s:%d: notices lost (%s); trying the next", host, port, exc)
                await asyncio.sleep(min(5.0, 0.2 * failures))
            finally:
                try:
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
                except Exception:  # already broken
                    pass

    async def _switched(self) -> None:
        await self.reset_commands()
        for callback in self._on_switch:
            callback()

    async def reset_commands(self) -> None:
        """Drop the command pools' connections: the next commands connect again, to where the
        topology points now (after a switch, or a subscription found deaf: pooled connections
        may still reach an old primary that takes writes)."""
        for direct in self._direct:
            direct.reset()
        for client in self._clients:
            try:
                if isinstance(client, RedisCluster):
                    await client.nodes_manager.initialize()
                else:
                    await client.connection_pool.disconnect()
            except Exception as exc:  # the old primary is gone: nothing to close cleanly
                log.debug("dropping the command pool: %s", exc)

    async def aclose(self) -> None:
        for direct in self._direct:
            await direct.aclose()
        if self._slot_map is not None:
            await self._slot_map.aclose()
