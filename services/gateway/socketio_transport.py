"""Socket.IO tabs on the gateway core: today's Portico frontend, unchanged.

The frontend (socket.io-client 4.8, path `/wss/socket.io`, `transports: ['polling',
'websocket']`) sends and receives the raw protocol's JSON objects as the event `"message"`
on namespace `/`: `42["message",{...}]`. `PorticoNamespace` turns each Socket.IO connection
into a gateway `Client` whose link (`SocketIOLink`) writes frames as that event, so sessions,
rooms, carts, relays, budgets and drain are the raw WebSocket's, on both transports of
Engine.IO.

What differs from a raw socket, for that client's sake:
* after `connection_success` an unsolicited `session_update_confirmation {success: true}`
  (the client counts itself connected only on that message, and does not resend
  `update_session` after a reconnect);
* a cart push carries its `seq` as the Socket.IO offset (the event's last argument, with
  connection-state recovery): a tab that reconnects with the offset of the cart this gateway
  last pushed for its session gets no second copy of it;
* closing (drain, slow consumer, rate limit) ends the Engine.IO session without a Socket.IO
  DISCONNECT, so socket.io-client reconnects by itself, as a raw tab would.

A tab that falls behind is handled as a raw one is: once the Engine.IO queue is half full the
link makes the gateway's writer wait, so newer frames queue in the gateway's outbox (a newer
cart replacing a queued one) and a full outbox drops the tab as a slow consumer.
"""

from __future__ import annotations

import logging
import secrets
from typing import TYPE_CHECKING, Any

from shared.codec import dumps
from shared.protocol import mask_session_id

from .connection import Send
from .engineio import OUTGOING_FULL
from .socketio import Socket, is_ascii_digits

if TYPE_CHECKING:
    from .app import Client, Gateway

EVENT = "message"
log = logging.getLogger(__name__)


class SocketIOLink:
    """What the gateway's writer sends through: one Socket.IO socket."""

    __slots__ = ("scope", "socket")
    transport = "socketio"

    def __init__(self, socket: Socket) -> None:
        self.socket = socket
        self.scope = socket.session.scope

    async def send_text(self, text: str) -> None:
        await self._send(text, None)

    async def send_cart(self, text: str, seq: int) -> None:
        """A cart push, with its seq as the connection-state-recovery offset."""
        await self._send(text, str(seq))

    async def _send(self, text: str, offset: str | None) -> None:
        session = self.socket.session
        if session.closed:
            raise ConnectionError("socket.io session closed")
        self.socket.send_event_json(EVENT, text, offset)
        if session.crowded():
            # The tab is behind (a poll not yet back, a slow WebSocket): the gateway's writer
            # waits, so what follows queues in its outbox, where a newer cart replaces a queued
            # one and a full outbox is a slow consumer, as for a raw socket.
            await session.drained()

    async def close(self, code: int, reason: str) -> None:
        self.socket.session.close(f"closed by the gateway ({code} {reason})")

    def abort(self) -> None:
        self.socket.session.close("aborted by the gateway")


class PorticoNamespace:
    """Namespace `/`: each socket is a gateway client."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.pid = secrets.token_urlsafe(12)  # connection-state recovery: offsets are seqs

    def on_connect(self, socket: Socket, auth: dict[str, Any]) -> None:
        offset = auth.get("offset")
        client = self.gateway.open_client(SocketIOLink(socket), "socketio")
        socket.data = client
        cookie = _cookie(socket)
        known_seq = (
            int(offset) if isinstance(offset, str) and len(offset) < 20 and is_ascii_digits(offset) else 0
        )
        self.gateway.feed(client, lambda: self._opened(client, cookie, known_seq))

    def _opened(self, client: Client, cookie: str | None, known_seq: int) -> list[Any]:
        actions = self.gateway.open_actions(client, cookie, known_seq=known_seq)
        if client.protocol.session_id is not None:
            actions.append(
                Send(
                    {
                        "type": "session_update_confirmation",
                        "success": True,
                        "message": "Session ID taken from the session cookie",
                        "action": "set",
                        "wasRequired": False,
                        "sessionId": mask_session_id(client.protocol.session_id),
                    }
                )
            )
        return actions

    def on_event(self, socket: Socket, name: str, args: list[Any], ack_id: int | None) -> None:
        client: Client | None = socket.data
        if client is None:
            return
        if name == EVENT and len(args) >= 1 and isinstance(args[0], dict):
            try:
                text = dumps(args[0])
            except TypeError:  # a binary event: its attachments (bytes) have no JSON form
                self.gateway.feed(client, lambda: client.protocol.on_foreign("socket.io binary message"))
                return
            self.gateway.feed(client, lambda: client.protocol.on_text(text))
        else:
            self.gateway.feed(client, lambda: client.protocol.on_foreign(f"socket.io event {name[:40]!r}"))

    def on_disconnect(self, socket: Socket, reason: str) -> None:
        client: Client | None = socket.data
        if client is not None:
            socket.data = None
            if reason.startswith(OUTGOING_FULL):  # a polling tab that stopped polling
                self.gateway.metrics.slow_consumers.labels("closed").inc()
                log.warning("socket %d: outgoing buffer full, dropping slow consumer", client.id)
            self.gateway.close_client(client)


def _cookie(socket: Socket) -> str | None:
    for key, value in socket.session.scope.get("headers", ()):
        if key == b"cookie":
            return str(value.decode("latin-1"))
    return None
