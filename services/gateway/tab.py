"""A tab: one browser connection to this gateway, and the link the core writes it through.

The core (`gateway.py`, `writer.py`, `fanout.py`) knows a tab by this class only. Each
transport brings its own `Link` (a raw WebSocket, a Socket.IO socket): centrifuge's
`Transport` has three methods, ours adds `try_write` (the fast path), and the core never asks
which transport a tab uses.

Words, as used across the gateway (and the README):
  tab           one browser connection to this gateway, on either transport
  link          what a tab's messages are written through (its transport's side)
  session       the PHP session (its id is secret: only the first 8 characters are logged)
  session hash  SHA-256 hex of the session id: names the session in Redis and in envelopes
  room          an entity or user room (`entity_<type>_<id>`, `user_<type>_<id>`)
  route         what Redis ownership is kept for: a session hash, or `room:<room>`
  event         a message for tabs that is not a cart (notification, room message, relay,
                broadcast), rendered once as JSON text
  frame         only ever a WebSocket frame (RFC 6455)
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from .outbox import Outbox
from .tab_protocol import TabProtocol


class Link(Protocol):
    """How the core writes to one tab. `write` may wait (a peer that reads slowly); `try_write`
    never does; `close` ends the connection in order (a close frame, or the end of the Engine.IO
    session); `abort` drops it at once, for a peer that does not even take a close."""

    transport: str  # "websocket" (raw) or "socketio": a metric label, never a branch

    async def write(self, text: str, seq: int) -> None:
        """One message; `seq` is the cart's when it is a cart push (else 0): Socket.IO sends it
        as the connection-state-recovery offset."""

    def try_write(self, text: str, seq: int) -> bool:
        """`write`, at once, if the link takes it without waiting; else False, nothing written
        (the writer then queues it and waits)."""

    async def close(self, code: int, reason: str) -> None: ...

    def abort(self) -> None: ...


class Tab:
    """One open connection. Idle tabs are most of them: no task, no queue of their own until
    there is something to write (`writer.py`)."""

    __slots__ = (
        "cart_seq",
        "detached",
        "finished",
        "gone",
        "id",
        "link",
        "outbox",
        "protocol",
        "session_hash",
        "writer",
    )

    def __init__(self, tab_id: int, link: Link, protocol: TabProtocol, outbox: Outbox) -> None:
        self.id = tab_id
        self.link = link
        self.protocol = protocol
        self.outbox = outbox
        self.session_hash: str | None = None  # the session it is in (`hub.py`)
        self.cart_seq = 0  # seq of the newest cart sent: older ones are never sent after it
        self.writer: asyncio.Task[None] | None = None  # while its outbox has something
        self.detached = False  # out of every session and room: receives nothing more
        self.finished = False  # the connection is over
        # Created only for a tab being dropped (idle tabs stay small); set when finished.
        self.gone: asyncio.Event | None = None
