"""What arrives on this gateway's Redis channels, to the sockets it is for.

The gateway subscribes to its own channel and to the all-gateways channel (`shared.keys`).
Every message is checked whole before it changes anything (`codec.decode_deliveries`); an
invalid one is counted and logged, never raised. A message is one envelope or a batch of them:

* `cart`: a session's cart with its `seq`. Pushed to every tab of the session (when `all`),
  and the answer to each cart request it names by token (a join gets it as a push, a get as
  the reply with its request id). A tab never gets an older cart after a newer one (`hub.py`).
* `frame`: text already rendered for a session, a room, or every socket (a relay from a tab
  on another gateway, or a broadcast).
* `resync`: the fetchers' shards changed hands; the sessions of those shards ask for their
  carts again.

After the subscription (re)connects, this gateway was deaf for a while: it claims again what
it holds and asks for fresh carts of every session here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from shared import codec
from shared.protocol import shard_of

from .frames import render_cart
from .outbox import Outgoing

if TYPE_CHECKING:
    from .app import Client, Gateway

log = logging.getLogger(__name__)

CART_MESSAGE = "partial_applications_response"  # a push or a reply: the metrics' kind


class Deliveries:
    def __init__(self, gateway: Gateway) -> None:
        self._gateway = gateway

    async def on_subscribed(self) -> None:
        gateway = self._gateway
        await gateway.ownership.claim_all()
        if gateway.hub.session_ids:
            await gateway.request_refresh(list(gateway.hub.session_ids.values()))

    async def on_delivery(self, channel: str, data: bytes) -> None:
        try:
            envelopes = codec.decode_deliveries(data)  # fully checked before any state changes
        except codec.CodecError as exc:
            envelopes = [exc]
        for envelope in envelopes:
            if isinstance(envelope, codec.CodecError):
                self._gateway.metrics.deliveries_invalid.inc()
                log.warning("dropped invalid envelope on %s (%s)", channel, envelope)
            elif envelope["kind"] == codec.CART:
                self._cart(envelope)
            elif envelope["kind"] == codec.FRAME:
                self._frame(envelope)
            else:
                await self._resync(envelope)

    def _cart(self, cart: dict[str, Any]) -> None:
        gateway, hub = self._gateway, self._gateway.hub
        key, seq = cart["key"], int(cart["seq"])
        received_at = cart.get("received_at")
        shared_frame: Outgoing | None = None

        def push_frame() -> Outgoing:
            # Rendered once per push and shared by every socket (its byte count too).
            nonlocal shared_frame
            if shared_frame is None:
                text = render_cart(cart, push=True)
                shared_frame = Outgoing(text, CART_MESSAGE, cart=True, received_at=received_at, seq=seq)
            return shared_frame

        if cart["all"]:
            for client in hub.session_members(key):
                if hub.accept_push(client, seq):
                    gateway.enqueue(client, push_frame())
                else:
                    gateway.metrics.stale_carts_dropped.inc()
        for token, _kind in cart["tokens"]:
            pending = gateway.pending.answer(token)
            if pending is None:
                continue  # answered already, or timed out
            client = pending.client
            if client.protocol.closed or client.session_key != key:
                continue  # gone, or moved to another session since asking
            if pending.kind == codec.JOIN:
                if hub.accept_push(client, seq):
                    gateway.enqueue(client, push_frame())
            elif not hub.accept_reply(client, seq) and gateway.pending.ask_again(
                token, pending, time.monotonic()
            ):
                # Older than a cart this tab already has (possible only around a shard
                # hand-over): ask again rather than show an older snapshot after a newer one.
                gateway.publish_request(codec.GET, client, token)
            else:
                text = render_cart(
                    cart, push=False, request_id=pending.request_id, has_request_id=pending.has_request_id
                )
                gateway.enqueue(client, Outgoing(text, CART_MESSAGE))

    def _frame(self, envelope: dict[str, Any]) -> None:
        gateway = self._gateway
        frame = Outgoing(envelope["frame"], "routed", received_at=envelope.get("received_at"))
        members: Iterable[Client]
        if envelope.get("broadcast") is True:
            members = list(gateway.clients.values())
        elif "room" in envelope:
            members = gateway.hub.room_members(envelope["room"])
        else:
            members = gateway.hub.session_members(envelope["key"])
        for client in members:
            gateway.enqueue(client, frame)

    async def _resync(self, envelope: dict[str, Any]) -> None:
        shards, of = set(envelope["shards"]), int(envelope["of"])
        sids = [sid for key, sid in self._gateway.hub.session_ids.items() if shard_of(key, of) in shards]
        if sids:
            await self._gateway.request_refresh(sids)
