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
