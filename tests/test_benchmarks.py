"""The benchmarks' own command lines (`make bench` runs them; the suite only checks they start)."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("module", "argument"),
    [
        ("benchmarks.push", "--storm"),
        ("benchmarks.push", "--idle-seconds"),
        ("benchmarks.push", "--rate"),
        ("benchmarks.idle_memory", "--connections"),
        ("benchmarks.transports", "--tabs"),
        ("benchmarks.fanout", "--applications"),
        ("benchmarks.redis_cluster", "--sessions"),
        ("benchmarks.redis_cluster", "--idle-seconds"),
    ],
)
def test_a_zero_is_refused_with_a_clear_error_not_a_crash_at_the_end(module: str, argument: str):
    """Bug: `make bench` with `--storm 0` or `--idle-seconds 0` ran for minutes, then died on a
    ZeroDivisionError while printing its table."""
    result = subprocess.run(
        [sys.executable, "-m", module, argument, "0"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert f"argument {argument}: must be above 0, got 0" in result.stderr
    assert "Traceback" not in result.stderr
