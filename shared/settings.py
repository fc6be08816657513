"""Typed configuration from the environment, validated once at start-up.

A wrong value raises `ConfigError` naming the variable; the entry points print it and exit 2.
URLs may carry passwords: `repr` and logs only ever show `redact_url(...)`.
"""

from __future__ import annotations

import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar
from urllib.parse import urlsplit, urlunsplit

from shared.protocol import BUDGET_NAMES, DEFAULT_COOKIE_NAMES


class ConfigError(ValueError):
    """A configuration variable has a value the service cannot run with."""


def redact_url(url: str) -> str:
    """`redis://:secret@host/0` -> `redis://:***@host/0` (for logs and repr)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def server_problem(what: str, url: str, exc: BaseException) -> str:
    """`cannot reach Redis at redis://:***@host/0 (first line of the error)`: one line, no
    password. For the CLI and `portico-push stack`."""
    detail = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
    return f"cannot reach {what} at {redact_url(url)} ({detail})"


class _Env:
    """Reads variables from one mapping; every error names the variable."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ

    def _raw(self, name: str) -> str | None:
        value = self._environ.get(name)
        if value is None or value.strip() == "":
            return None
        return value.strip()

    def text(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def integer(self, name: str, default: int, *, low: int, high: int) -> int:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def number(self, name: str, default: float, *, low: float, high: float) -> float:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
        if not low <= value <= high:
            raise ConfigError(f"{name} must be between {low} and {high}, got {value}")
        return value

    def flag(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name} must be true or false, got {raw!r}")

    def url(self, name: str, default: str, schemes: tuple[str, ...]) -> str:
        raw = self._raw(name) or default
        parts = urlsplit(raw)
        if parts.scheme not in schemes or not (parts.hostname or parts.path):
            shown = redact_url(raw) if "@" in raw else raw
            raise ConfigError(f"{name} must be a {'/'.join(schemes)} URL, got {shown!r}")
        return raw

    def items(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        raw = self._raw(name)
        if raw is None:
            return default
        items = tuple(item.strip() for item in raw.split(",") if item.strip())
        if not items:
            raise ConfigError(f"{name} must be a comma-separated list, got {raw!r}")
        return items


def _default_instance_id() -> str:
    # Unique per process: a restarted container keeps its host name (and pid 1).
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def _check_id(name: str, value: str) -> str:
    if not value or len(value) > 200 or any(c.isspace() for c in value):
        raise ConfigError(f"{name} must be 1-200 characters without spaces, got {value!r}")
    return value


def _check_origins(name: str, origins: tuple[str, ...]) -> tuple[str, ...]:
    for origin in origins:
        if origin == "*":
            continue
        parts = urlsplit(origin)
        if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
            raise ConfigError(
                f"{name} entries must be exact origins like https://booking.example.no "
                f"(or '*'), got {origin!r}"
            )
    return tuple(o.rstrip("/") for o in origins)


REDIS_MODES = ("node", "sentinel", "cluster")


def _host_ports(name: str, raw: str) -> tuple[tuple[str, int], ...]:
    """`host:port,host:port` (IPv6 as `[::1]:26379`), at least one, each port 1-65535."""
    found = []
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{name} must be host:port,host:port,..., got {item!r}")
        found.append((host, int(port)))
    if not found:
        raise ConfigError(f"{name} must name at least one host:port")
    return tuple(found)


@dataclass(frozen=True)
class RedisSettings:
    """Where Redis is: one node (`REDIS_URL`), a master found through Sentinel
    (`REDIS_SENTINELS` + `REDIS_SENTINEL_MASTER`), or a Cluster (`REDIS_CLUSTER_NODES`).
    Exactly one way; `shared/redis_topology.py` makes the clients."""

    url: str = field(repr=False)
    prefix: str
    mode: str = "node"
    sentinels: tuple[tuple[str, int], ...] = ()
    sentinel_master: str = ""
    sentinel_password: str = field(default="", repr=False)
    cluster_nodes: tuple[tuple[str, int], ...] = ()
    password: str = field(default="", repr=False)  # the data nodes' (Sentinel and Cluster modes)

    def __repr__(self) -> str:
        if self.mode == "sentinel":
            where = f"sentinels={self.sentinels!r}, master={self.sentinel_master!r}"
        elif self.mode == "cluster":
            where = f"cluster_nodes={self.cluster_nodes!r}"
        else:
            where = f"url={redact_url(self.url)!r}"
        return f"RedisSettings(mode={self.mode!r}, {where}, prefix={self.prefix!r})"

    @classmethod
    def from_env(cls, env: _Env) -> RedisSettings:
        prefix = env.text("REDIS_PREFIX", "portico:")
        if any(c.isspace() for c in prefix) or len(prefix) > 64:
            raise ConfigError(f"REDIS_PREFIX must be at most 64 characters without spaces, got {prefix!r}")
        given = [
            name for name in ("REDIS_URL", "REDIS_SENTINELS", "REDIS_CLUSTER_NODES") if env.text(name, "")
        ]
        if len(given) > 1:
            raise ConfigError(
                f"set one of REDIS_URL, REDIS_SENTINELS, REDIS_CLUSTER_NODES, not {' and '.join(given)}"
            )
        password = env.text("REDIS_PASSWORD", "")
        if given == ["REDIS_SENTINELS"]:
            master = env.text("REDIS_SENTINEL_MASTER", "")
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,128}", master):
                raise ConfigError(
                    f"REDIS_SENTINEL_MASTER must name the master Sentinel watches, got {master!r}"
                )
            return cls(
                url="",
                prefix=prefix,
                mode="sentinel",
                sentinels=_host_ports("REDIS_SENTINELS", env.text("REDIS_SENTINELS", "")),
                sentinel_master=master,
                sentinel_password=env.text("REDIS_SENTINEL_PASSWORD", ""),
                password=password,
            )
        if given == ["REDIS_CLUSTER_NODES"]:
            nodes = _host_ports("REDIS_CLUSTER_NODES", env.text("REDIS_CLUSTER_NODES", ""))
            return cls(url="", prefix=prefix, mode="cluster", cluster_nodes=nodes, password=password)
        for name in ("REDIS_SENTINEL_MASTER", "REDIS_SENTINEL_PASSWORD", "REDIS_PASSWORD"):
            if env.text(name, ""):
                raise ConfigError(
                    f"{name} is for Sentinel or Cluster mode; with REDIS_URL the URL carries it"
                )
        return cls(
            url=env.url("REDIS_URL", "redis://127.0.0.1:6379/0", ("redis", "rediss", "unix")), prefix=prefix
        )


@dataclass(frozen=True)
class GatewaySettings:
    redis: RedisSettings
    host: str = "0.0.0.0"
    port: int = 8080
    gateway_id: str = "gateway"
    allowed_origins: tuple[str, ...] = ()  # empty: same-origin only
    cookie_names: tuple[str, ...] = DEFAULT_COOKIE_NAMES
    max_frame_bytes: int = 65536
    outbox_frames: int = 64
    bad_message_burst: int = 10
    bad_message_refill_per_second: float = 0.2
    message_budgets: tuple[tuple[str, int, float], ...] = ()  # (name, burst, per second) overrides
    ownership_ttl_seconds: float = 10.0
    request_timeout_seconds: float = 10.0
    ws_ping_interval_seconds: float = 30.0
    server_ping_interval_seconds: float = 60.0
    per_message_deflate: bool = False
    drain_seconds: float = 10.0
    max_connections: int = 20000
    handshake_timeout_seconds: float = 10.0
    trust_forwarded_proto: bool = False
    socketio_ping_interval_seconds: float = 25.0
    socketio_ping_timeout_seconds: float = 20.0
    socketio_connect_timeout_seconds: float = 45.0
    socketio_affinity_cookie: str = ""  # cookie naming this gateway on polling handshakes
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> GatewaySettings:
        env = _Env(os.environ if environ is None else environ)
        return cls(
            redis=RedisSettings.from_env(env),
            host=env.text("GATEWAY_HOST", "0.0.0.0"),
            port=env.integer("GATEWAY_PORT", 8080, low=1, high=65535),
            gateway_id=_check_id("GATEWAY_ID", env.text("GATEWAY_ID", _default_instance_id())),
            allowed_origins=_check_origins("ALLOWED_ORIGINS", env.items("ALLOWED_ORIGINS", ())),
            cookie_names=env.items("SESSION_COOKIE_NAMES", DEFAULT_COOKIE_NAMES),
            max_frame_bytes=env.integer("MAX_FRAME_BYTES", 65536, low=1024, high=16 * 1024 * 1024),
            outbox_frames=env.integer("OUTBOX_FRAMES", 64, low=2, high=10000),
            bad_message_burst=env.integer("BAD_MESSAGE_BURST", 10, low=1, high=10000),
            bad_message_refill_per_second=env.number(
                "BAD_MESSAGE_REFILL_PER_SECOND", 0.2, low=0.0, high=1000.0
            ),
            message_budgets=_message_budgets(env.text("MESSAGE_BUDGETS", "")),
            ownership_ttl_seconds=env.number("OWNERSHIP_TTL_SECONDS", 10.0, low=1.0, high=3600.0),
            request_timeout_seconds=env.number("REQUEST_TIMEOUT_SECONDS", 10.0, low=0.1, high=300.0),
            ws_ping_interval_seconds=env.number("WS_PING_INTERVAL_SECONDS", 30.0, low=1.0, high=3600.0),
            server_ping_interval_seconds=env.number(
                "SERVER_PING_INTERVAL_SECONDS", 60.0, low=1.0, high=3600.0
            ),
            per_message_deflate=env.flag("WS_PER_MESSAGE_DEFLATE", False),
            drain_seconds=env.number("DRAIN_SECONDS", 10.0, low=0.0, high=3600.0),
            max_connections=env.integer("MAX_CONNECTIONS", 20000, low=1, high=1_000_000),
            handshake_timeout_seconds=env.number("HANDSHAKE_TIMEOUT_SECONDS", 10.0, low=0.5, high=300.0),
            trust_forwarded_proto=env.flag("TRUST_FORWARDED_PROTO", False),
            socketio_ping_interval_seconds=env.number(
                "SOCKETIO_PING_INTERVAL_SECONDS", 25.0, low=0.1, high=3600.0
            ),
            socketio_ping_timeout_seconds=env.number(
                "SOCKETIO_PING_TIMEOUT_SECONDS", 20.0, low=0.1, high=3600.0
            ),
            socketio_connect_timeout_seconds=env.number(
                "SOCKETIO_CONNECT_TIMEOUT_SECONDS", 45.0, low=0.1, high=3600.0
            ),
            socketio_affinity_cookie=_check_cookie_name(env.text("SOCKETIO_AFFINITY_COOKIE", "")),
            log_level=_log_level(env),
        )


def _message_budgets(text: str) -> tuple[tuple[str, int, float], ...]:
    """`MESSAGE_BUDGETS`: `name=burst/per_second`, comma-separated; names are client message
    types or `any`, `new_session`, `not_implemented` (services/gateway/budgets.py)."""
    budgets: list[tuple[str, int, float]] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        name, sep, shape = entry.partition("=")
        burst_text, slash, rate_text = shape.partition("/")
        name = name.strip()
        try:
            burst, rate = int(burst_text), float(rate_text)
        except ValueError:
            burst, rate = -1, -1.0
        if not (sep and slash) or not (1 <= burst <= 100_000 and 0 <= rate <= 10_000):
            raise ConfigError(
                f"MESSAGE_BUDGETS entries must be name=burst/per_second (burst 1-100000, per_second "
                f"0-10000), got {entry!r}"
            )
        if name not in BUDGET_NAMES:
            raise ConfigError(
                f"MESSAGE_BUDGETS: {name[:40]!r} is not a budget (one of {', '.join(sorted(BUDGET_NAMES))})"
            )
        budgets.append((name, burst, rate))
    return tuple(budgets)


def _check_cookie_name(name: str) -> str:
    if name and not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise ConfigError(f"SOCKETIO_AFFINITY_COOKIE must be a cookie name (A-Z, 0-9, _ . -), got {name!r}")
    return name


@dataclass(frozen=True)
class FetcherSettings:
    redis: RedisSettings
    database_url: str = field(repr=False, default="postgresql://postgres@127.0.0.1:5432/postgres")
    host: str = "0.0.0.0"
    port: int = 8090
    fetcher_id: str = "fetcher"
    shards: int = 64
    lease_ttl_seconds: float = 6.0
    fetch_concurrency: int = 8
    fetch_batch_max: int = 64
    fetch_batch_window_seconds: float = 0.002
    cart_snapshot_ttl_seconds: float = 3600.0
    db_pool_size: int = 8
    db_timeout_seconds: float = 5.0
    max_payload_bytes: int = 1024 * 1024
    log_level: str = "INFO"

    def __repr__(self) -> str:
        return (
            f"FetcherSettings(redis={self.redis!r}, database_url={redact_url(self.database_url)!r}, "
            f"fetcher_id={self.fetcher_id!r}, shards={self.shards}, port={self.port})"
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FetcherSettings:
        env = _Env(os.environ if environ is None else environ)
        concurrency = env.integer("FETCH_CONCURRENCY", 8, low=1, high=1000)
        return cls(
            redis=RedisSettings.from_env(env),
            database_url=env.url(
                "DATABASE_URL",
                "postgresql://postgres@127.0.0.1:5432/postgres",
                ("postgresql", "postgres"),
            ),
            host=env.text("FETCHER_HOST", "0.0.0.0"),
            port=env.integer("FETCHER_PORT", 8090, low=1, high=65535),
            fetcher_id=_check_id("FETCHER_ID", env.text("FETCHER_ID", _default_instance_id())),
            shards=env.integer("SHARDS", 64, low=1, high=4096),
            lease_ttl_seconds=env.number("LEASE_TTL_SECONDS", 6.0, low=1.0, high=600.0),
            fetch_concurrency=concurrency,
            fetch_batch_max=env.integer("FETCH_BATCH_MAX", 64, low=1, high=1000),
            fetch_batch_window_seconds=env.number("FETCH_BATCH_WINDOW_MS", 2.0, low=0.0, high=1000.0) / 1000,
            cart_snapshot_ttl_seconds=env.number(
                "CART_SNAPSHOT_TTL_SECONDS", 3600.0, low=0.0, high=7 * 86400.0
            ),
            db_pool_size=env.integer("DB_POOL_SIZE", concurrency, low=1, high=1000),
            db_timeout_seconds=env.number("DB_TIMEOUT_SECONDS", 5.0, low=0.1, high=600.0),
            # An event must fit in one message on a gateway's channel (shared.envelopes.MAX_MESSAGE_BYTES).
            max_payload_bytes=env.integer("MAX_PAYLOAD_BYTES", 1024 * 1024, low=1024, high=3 * 1024 * 1024),
            log_level=_log_level(env),
        )


_Settings = TypeVar("_Settings", "GatewaySettings", "FetcherSettings")


def load_or_exit(cls: type[_Settings], program: str) -> _Settings:
    """Settings from the environment, or exit 2 with the message naming the variable."""
    try:
        return cls.from_env()
    except ConfigError as exc:
        print(f"{program}: configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def _log_level(env: _Env) -> str:
    level = env.text("LOG_LEVEL", "INFO").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
    return level
