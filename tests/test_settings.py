"""Configuration: validated once, errors name the variable, secrets never in repr."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from shared.settings import ConfigError, FetcherSettings, GatewaySettings, redact_url


def test_defaults():
    gateway = GatewaySettings.from_env({})
    assert gateway.port == 8080 and gateway.host == "0.0.0.0" and gateway.allowed_origins == ()
    assert gateway.cookie_names == ("bookingfrontendsession", "sessionphpgwsessid", "PHPSESSID")
    assert gateway.redis.prefix == "portico:" and gateway.gateway_id
    assert GatewaySettings.from_env({}).gateway_id != gateway.gateway_id, "unique per process start"
    fetcher = FetcherSettings.from_env({})
    assert fetcher.shards == 64 and fetcher.port == 8090


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"GATEWAY_PORT": "eighty"}, "GATEWAY_PORT"),
        ({"GATEWAY_PORT": "70000"}, "GATEWAY_PORT"),
        ({"REDIS_URL": "http://x"}, "REDIS_URL"),
        ({"ALLOWED_ORIGINS": "booking.example.no"}, "ALLOWED_ORIGINS"),
        ({"ALLOWED_ORIGINS": "https://a.no/path"}, "ALLOWED_ORIGINS"),
        ({"WS_PER_MESSAGE_DEFLATE": "maybe"}, "WS_PER_MESSAGE_DEFLATE"),
        ({"GATEWAY_ID": "has space"}, "GATEWAY_ID"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        ({"REDIS_PREFIX": "a b"}, "REDIS_PREFIX"),
        ({"MESSAGE_BUDGETS": "subscribe=10"}, "MESSAGE_BUDGETS"),
        ({"MESSAGE_BUDGETS": "subscribe=ten/1"}, "MESSAGE_BUDGETS"),
        ({"MESSAGE_BUDGETS": "subscribe=0/1"}, "MESSAGE_BUDGETS"),
        ({"MESSAGE_BUDGETS": "subscribe=5/nan"}, "MESSAGE_BUDGETS"),
        ({"MESSAGE_BUDGETS": "subscrbe=5/1"}, "MESSAGE_BUDGETS"),
    ],
)
def test_gateway_errors_name_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        GatewaySettings.from_env(env)


def test_fetcher_errors_name_the_variable():
    with pytest.raises(ConfigError, match="DATABASE_URL"):
        FetcherSettings.from_env({"DATABASE_URL": "mysql://x"})
    with pytest.raises(ConfigError, match="SHARDS"):
        FetcherSettings.from_env({"SHARDS": "0"})


def test_secrets_stay_out_of_repr_and_errors():
    fetcher = FetcherSettings.from_env(
        {"REDIS_URL": "redis://:hunter2@redis:6379/0", "DATABASE_URL": "postgresql://app:pa55@db/portico"}
    )
    assert "hunter2" not in repr(fetcher) and "pa55" not in repr(fetcher)
    assert "***" in repr(fetcher)
    gateway = GatewaySettings.from_env({"REDIS_URL": "redis://:hunter2@redis:6379/0"})
    assert "hunter2" not in repr(gateway)
    with pytest.raises(ConfigError) as caught:
        FetcherSettings.from_env({"DATABASE_URL": "mysql://app:pa55@db/x"})
    assert "pa55" not in str(caught.value)
    assert redact_url("redis://user:pw@h:1/0") == "redis://user:***@h:1/0"


@pytest.mark.parametrize(
    ("command", "variable"), [("portico-gateway", "GATEWAY_PORT"), ("portico-fetcher", "FETCHER_PORT")]
)
def test_process_refuses_to_start_with_a_bad_value(command, variable):
    binary = os.path.join(os.path.dirname(sys.executable), command)
    result = subprocess.run(
        [binary], env={**os.environ, variable: "not-a-port"}, capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2
    assert variable in result.stderr and "configuration error" in result.stderr


def test_redis_is_one_node_a_sentinel_set_or_a_cluster():
    """REDIS_URL, REDIS_SENTINELS (+ REDIS_SENTINEL_MASTER) or REDIS_CLUSTER_NODES: exactly one.
    With Sentinel or Cluster set, the default REDIS_URL must not be used behind them."""
    node = GatewaySettings.from_env({}).redis
    assert node.mode == "node" and node.url == "redis://127.0.0.1:6379/0"
    sentinel = GatewaySettings.from_env(
        {
            "REDIS_SENTINELS": "10.0.0.1:26379, [::1]:26380",
            "REDIS_SENTINEL_MASTER": "portico",
            "REDIS_SENTINEL_PASSWORD": "s3cret",
            "REDIS_PASSWORD": "hunter2",
        }
    ).redis
    assert sentinel.mode == "sentinel" and sentinel.url == ""
    assert (
        sentinel.sentinels == (("10.0.0.1", 26379), ("::1", 26380)) and sentinel.sentinel_master == "portico"
    )
    assert "s3cret" not in repr(sentinel) and "hunter2" not in repr(sentinel)
    cluster = FetcherSettings.from_env({"REDIS_CLUSTER_NODES": "redis-0:6379,redis-1:6379"}).redis
    assert cluster.mode == "cluster" and cluster.url == "" and len(cluster.cluster_nodes) == 2
    for env, message in [
        (
            {"REDIS_URL": "redis://a:6379/0", "REDIS_CLUSTER_NODES": "b:6379"},
            "REDIS_URL and REDIS_CLUSTER_NODES",
        ),
        (
            {"REDIS_SENTINELS": "a:26379", "REDIS_CLUSTER_NODES": "b:6379"},
            "REDIS_SENTINELS and REDIS_CLUSTER_NODES",
        ),
        ({"REDIS_SENTINELS": "a:26379"}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_SENTINELS": "a", "REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINELS"),
        ({"REDIS_CLUSTER_NODES": "b:99999"}, "REDIS_CLUSTER_NODES"),
        ({"REDIS_CLUSTER_NODES": " , "}, "REDIS_CLUSTER_NODES"),
        ({"REDIS_SENTINEL_MASTER": "m"}, "REDIS_SENTINEL_MASTER"),
        ({"REDIS_PASSWORD": "x"}, "REDIS_PASSWORD"),
    ]:
        with pytest.raises(ConfigError, match=message):
            GatewaySettings.from_env(env)


@pytest.mark.parametrize("command", ["portico-gateway", "portico-fetcher"])
def test_two_redis_topologies_at_once_refuse_to_start(command):
    binary = os.path.join(os.path.dirname(sys.executable), command)
    env = {**os.environ, "REDIS_URL": "redis://127.0.0.1:6379/0", "REDIS_SENTINELS": "127.0.0.1:26379"}
    result = subprocess.run([binary], env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "REDIS_URL and REDIS_SENTINELS" in lines[0], result.stderr


def test_message_budgets_override_the_defaults_and_take_effect():
    """The rate budgets are configurable (`MESSAGE_BUDGETS`): an override replaces that budget
    only, and a tab past it is rate limited."""
    from services.gateway.budgets import DEFAULT_BUDGETS, Budget, Limits
    from services.gateway.tab_protocol import Close, TabProtocol

    settings = GatewaySettings.from_env({"MESSAGE_BUDGETS": "subscribe=2/0, any=100/50"})
    assert settings.message_budgets == (("subscribe", 2, 0.0), ("any", 100, 50.0))
    limits = Limits.of(10, 0.2, settings.message_budgets)
    assert limits.budgets["subscribe"] == Budget(2, 0.0) and limits.budgets["any"] == Budget(100, 50.0)
    assert {k: v for k, v in limits.budgets.items() if k not in ("subscribe", "any")} == {
        k: v for k, v in DEFAULT_BUDGETS.items() if k not in ("subscribe", "any")
    }
    tab = TabProtocol(limits)
    subscribe = '{"type":"subscribe","entityType":"resource","entityId":"%d"}'
    assert not any(isinstance(a, Close) for a in tab.on_text(subscribe % 1) + tab.on_text(subscribe % 2))
    assert any(isinstance(a, Close) for a in tab.on_text(subscribe % 3)), "the third is past a burst of 2"


def test_every_client_message_type_has_a_handler_and_only_those():
    from services.gateway.tab_protocol import _HANDLERS
    from shared.protocol import CLIENT_MESSAGE_TYPES

    assert set(_HANDLERS) == CLIENT_MESSAGE_TYPES
