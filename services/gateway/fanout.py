"""What arrives on this gateway's Redis channels, fanned out to the tabs it is for.

The gateway subscribes to its own channel and to the all-gateways channel (`shared.keys`).
Every message is checked whole before it changes anything (`shared.envelopes`); an invalid one
is counted and logged, never raised. A message is one envelope or a batch of them:

* `Cart`: a session's cart with its `seq`. Pushed to every tab of the session (when `push`),
  and the answer to each cart request it names by token (a join gets it as a push, a get as
  the reply with its request id). A tab never gets an older cart after a newer one (`hub.py`).
* `Event`: text already rendered for a session, a room, or every tab (a relay from a tab on
  another gateway, a notification, a broadcast).
* `Resync`: the fetchers' shards changed hands; the sessions of those shards ask for their
  carts again.

A fan-out iterates over a copy of the members: dropping a slow tab takes it out of the live
set, and iterating that set itself raised "Set changed size during iteration", which discarded
the rest of the message for every other session in it. And a full outbox is not yet a slow
consumer: the writers get a turn first (`Writer.settle`), since one message may carry more
for a tab than its outbox holds (100 events for one tab in one batch dropped a tab that read
everything, with the 64 it had queued).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Iterable

from shared.envelopes import JOIN, Cart, EnvelopeError, Event, Resync, decode_for_gateway
from shared.metrics import GatewayMetrics
from shared.protocol import shard_of

from .fetcher_requests import FetcherRequests
from .hub import Hub
from .outbox import Outgoing
from .rendering import render_cart
from .tab import Tab
from .writer import Writer

log = logging.getLogger(__name__)

CART_MESSAGE = "partial_applications_response"  # a push or a reply: the metrics' kind


class Fanout:
    def __init__(
        self,
        hub: Hub[Tab],
        tabs: dict[int, Tab],
        writer: Writer,
        requests: FetcherRequests,
        metrics: GatewayMetrics,
    ) -> None:
        self._hub = hub
        self._tabs = tabs  # every open tab (for broadcasts)
        self._writer = writer
        self._requests = requests
        self._metrics = metrics

    def on_message(self, channel: str, data: bytes) -> Awaitable[None] | None:
        """Called as the subscription reads the message. Returns None when it is fanned out
        already (the common case: no await, no task), or what is left to do when it must wait: a
        full outbox's writer getting its turn, or a resync's requests to the fetchers."""
        try:
            envelopes = decode_for_gateway(data)  # fully checked before any state changes
        except EnvelopeError as exc:
            envelopes = [exc]
        full: list[tuple[Tab, Outgoing]] = []  # outboxes that were full: their writers get a turn
        for n, envelope in enumerate(envelopes):
            if isinstance(envelope, Resync):
                return self._rest(channel, envelopes[n:], full)
            self._envelope(channel, envelope, full)
            if full:  # before the next envelope, so that each tab's messages keep their order
                return self._rest(channel, envelopes[n + 1 :], full)
        return None

    async def _rest(
        self,
        channel: str,
        envelopes: list[Cart | Event | Resync | EnvelopeError],
        full: list[tuple[Tab, Outgoing]],
    ) -> None:
        """`on_message` from where it had to wait."""
        if full:
            await self._writer.settle(full)
            full.clear()
        for envelope in envelopes:
            if isinstance(envelope, Resync):
                await self._resync(envelope)
                continue
            self._envelope(channel, envelope, full)
            if full:
                await self._writer.settle(full)
                full.clear()

    def _envelope(
        self, channel: str, envelope: Cart | Event | EnvelopeError, full: list[tuple[Tab, Outgoing]]
    ) -> None:
        if isinstance(envelope, EnvelopeError):
            self._metrics.deliveries_invalid.inc()
            log.warning("dropped invalid envelope on %s (%s)", channel, envelope)
        elif isinstance(envelope, Cart):
            self._cart(envelope, full)
        else:
            self._event(envelope, full)

    def _offer(self, tab: Tab, outgoing: Outgoing, full: list[tuple[Tab, Outgoing]]) -> None:
        if not self._writer.offer(tab, outgoing):
            full.append((tab, outgoing))

    def _cart(self, cart: Cart, full: list[tuple[Tab, Outgoing]]) -> None:
        hub = self._hub
        seq = cart.seq
        shared: Outgoing | None = None

        def push() -> Outgoing:
            # Rendered once per push and shared by every tab (its byte count too).
            nonlocal shared
            if shared is None:
                text = render_cart(cart, push=True)
                shared = Outgoing(text, CART_MESSAGE, cart=True, received_at=cart.received_at, seq=seq)
            return shared

        if cart.push:
            for tab in list(hub.session_members(cart.session_hash)):
                if hub.accept_push(tab, seq):
                    self._offer(tab, push(), full)
                else:
                    self._metrics.stale_carts_dropped.inc()
        for token, _kind in cart.tokens:
            pending = self._requests.answer(token)
            if pending is None:
                continue  # answered already, or timed out
            tab = pending.tab
            if tab.protocol.closed or tab.session_hash != cart.session_hash:
                continue  # gone, or moved to another session since asking
            if pending.kind == JOIN:
                if hub.accept_push(tab, seq):
                    self._offer(tab, push(), full)
            elif not hub.accept_reply(tab, seq) and self._requests.ask_again(token, pending):
                # Older than a cart this tab already has (possible only around a shard
                # hand-over): ask again rather than show an older snapshot after a newer one.
                pass
            else:
                text = render_cart(
                    cart, push=False, request_id=pending.request_id, has_request_id=pending.has_request_id
                )
                self._offer(tab, Outgoing(text, CART_MESSAGE), full)

    def _event(self, event: Event, full: list[tuple[Tab, Outgoing]]) -> None:
        outgoing = Outgoing(event.text, "event", received_at=event.received_at)
        members: Iterable[Tab]
        if event.broadcast:
            members = self._tabs.values()
        elif event.room is not None:
            members = self._hub.room_members(event.room)
        else:
            members = self._hub.session_members(event.session_hash or "")
        for tab in list(members):
            self._offer(tab, outgoing, full)

    async def _resync(self, resync: Resync) -> None:
        shards = set(resync.shards)
        sids = [
            sid for session, sid in self._hub.session_ids.items() if shard_of(session, resync.of) in shards
        ]
        if sids:
            await self._requests.refresh(sids)
