"""Asking the fetchers for carts: a tab joined (its cart comes as a push), a tab asked (the reply
carries its requestId), or this gateway may have missed pushes (a refresh of its sessions).

Requests of one moment leave together (`shared.batching`): a connect storm is a few messages,
not one per tab. Each waits in `CartRequests` (pure, with its deadline); the sweep asks a join
again when it is not answered in time and gives a get up with an error reply.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Iterable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from shared.batching import Batcher
from shared.envelopes import GET, JOIN, CartRequest, CartRequests, Refresh, encode
from shared.keys import Keys
from shared.metrics import GatewayMetrics
from shared.redis_topology import RedisTopology

from .hub import Hub
from .pending_requests import RETRY, PendingRequest, PendingRequests
from .tab import Tab

log = logging.getLogger(__name__)

REFRESH_BATCH = 500  # session ids per refresh envelope
REQUEST_BATCH = 500  # cart requests per requests envelope
REQUEST_ATTEMPTS = 3  # a cart request is sent at most this often (lost, or answered with an older cart)
SWEEP_SECONDS = 0.5
TIMEOUT_MESSAGE = "Timed out waiting for the cart; please try again"


class FetcherRequests:
    def __init__(
        self,
        redis: aioredis.Redis,
        topology: RedisTopology,
        keys: Keys,
        gateway_id: str,
        hub: Hub[Tab],
        *,
        timeout: float,
        metrics: GatewayMetrics,
        reply: Callable[[Tab, dict[str, Any]], None],
    ) -> None:
        self._redis = redis
        self._topology = topology
        self._channel = keys.fetcher_requests_channel
        self._gateway_id = gateway_id
        self._hub = hub
        self._metrics = metrics
        self._reply = reply  # sends one of the gateway's own messages to a tab
        self.pending: PendingRequests[Tab] = PendingRequests(timeout=timeout, attempts=REQUEST_ATTEMPTS)
        self._batcher: Batcher[CartRequest] = Batcher(
            self._publish, name="cart requests", max_items=REQUEST_BATCH
        )

    def loops(self) -> list[tuple[str, Coroutine[Any, Any, None]]]:
        return [("cart-requests", self._batcher.run()), ("request-sweep", self._sweep())]

    def ask(self, tab: Tab, kind: str, request_id: Any = None, has_request_id: bool = False) -> None:
        """A cart for `tab` (GET: a reply with its request id; JOIN: a push)."""
        token = self.pending.add(tab, kind, request_id, has_request_id, time.monotonic())
        self._submit(kind, tab, token)

    def answer(self, token: int) -> PendingRequest[Tab] | None:
        """The request a cart answers (None: answered already, or timed out)."""
        return self.pending.answer(token)

    def ask_again(self, token: int, pending: PendingRequest[Tab]) -> bool:
        """The answer was older than the tab's cart: ask again, within the same attempts."""
        if not self.pending.ask_again(token, pending, time.monotonic()):
            return False
        self._submit(pending.kind, pending.tab, token)
        return True

    def _submit(self, kind: str, tab: Tab, token: int) -> None:
        sid = self._hub.session_ids.get(tab.session_hash or "")
        if sid is not None:
            self._batcher.submit_nowait(CartRequest(sid, token, kind))

    async def _publish(self, items: list[CartRequest]) -> None:
        try:
            await self._topology.publish(
                self._redis, self._channel, encode(CartRequests(self._gateway_id, items))
            )
        except RedisError as exc:
            # Joins are asked again by the sweep; a get times out with an error reply.
            log.warning("%d cart request(s) not sent (%s)", len(items), exc)

    async def refresh(self, session_ids: Iterable[str]) -> None:
        """This gateway may have missed pushes: every session's current cart, pushed again."""
        sids = list(session_ids)
        for start in range(0, len(sids), REFRESH_BATCH):
            refresh = Refresh(self._gateway_id, sids[start : start + REFRESH_BATCH])
            await self._topology.publish(self._redis, self._channel, encode(refresh))

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            for outcome, token, pending in self.pending.due(time.monotonic(), lambda t: t.protocol.closed):
                if outcome == RETRY:
                    self._submit(JOIN, pending.tab, token)
                    continue
                self._metrics.requests_timed_out.inc()
                if pending.kind == GET:
                    reply: dict[str, Any] = {
                        "type": "partial_applications_response",
                        "data": {"error": True, "status": "error", "message": TIMEOUT_MESSAGE},
                    }
                    if pending.has_request_id:
                        reply["requestId"] = pending.request_id
                    self._reply(pending.tab, reply)
