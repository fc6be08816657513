"""Cost of turning one cart push into messages for N tabs: encode once vs encode per tab.

The gateway renders a push once (`render_cart`, splicing the fetcher's JSON text) and hands
the same string to every tab's outbox. The baseline, measured in the same run, is what a
naive gateway does: build and `json.dumps` the whole message for each tab.

    .venv/bin/python -m benchmarks.fanout [--tabs 1000] [--applications 10]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

from benchmarks.arguments import positive
from services.gateway.outbox import Outbox, Outgoing
from services.gateway.rendering import render_cart
from shared.codec import dumps
from shared.envelopes import Cart
from shared.protocol import session_hash

GOLDEN = Path(__file__).resolve().parent.parent / "tests" / "golden" / "cart.json"


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tabs", type=positive(int), default=1000)
    parser.add_argument("--applications", type=positive(int), default=10)
    args = parser.parse_args()
    golden = json.loads(GOLDEN.read_text())
    applications = [dict(golden[i % len(golden)], id=i) for i in range(args.applications)]
    fetched_at = "2025-05-12T11:54:20+00:00"
    cart = Cart(
        session_hash("abcdefghijk"),
        "abcdefgh...",
        1,
        fetched_at,
        dumps(applications),
        count=len(applications),
    )
    outboxes = [Outbox(64) for _ in range(args.tabs)]

    def encode_once() -> None:
        text = render_cart(cart, push=True)
        outgoing = Outgoing(text, "partial_applications_response", cart=True)
        for box in outboxes:
            box.put(outgoing)

    def encode_per_tab() -> None:
        for box in outboxes:
            message = {
                "type": "partial_applications_response",
                "data": {
                    "error": False,
                    "status": "success",
                    "applications": applications,
                    "count": len(applications),
                    "sessionId": "abcdefgh...",
                    "source": "server_push",
                    "timestamp": fetched_at,
                    "seq": 1,
                    "diff": None,
                },
                "timestamp": fetched_at,
            }
            box.put(Outgoing(dumps(message), "partial_applications_response", cart=True))

    once = best_of(20, encode_once)
    per_tab = best_of(5, encode_per_tab)
    size = len(render_cart(cart, push=True).encode())
    print(f"one push of a {args.applications}-application cart ({size} bytes) to {args.tabs} tabs")
    print(f"  encode once, share the text  : {once * 1000:8.2f} ms")
    print(f"  encode per tab (baseline)    : {per_tab * 1000:8.2f} ms")
    print(f"  speed-up                     : {per_tab / once:8.1f}x")


if __name__ == "__main__":
    main()
