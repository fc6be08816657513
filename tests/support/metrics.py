"""Reading a prometheus_client metric's current value in a test."""

from __future__ import annotations

from typing import Any


def metric_value(metric: Any, suffix: str = "_total", **labels: str) -> float:
    total = 0.0
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix) and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
