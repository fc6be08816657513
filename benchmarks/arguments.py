"""Command-line arguments the benchmarks share."""

from __future__ import annotations

import argparse
from typing import Any


def positive(kind: type[float] | type[int]) -> Any:
    """An argparse type: a number above zero (every figure is a ratio of these; 0 divided by
    zero and crashed the whole run at its end)."""

    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value

    return parse
