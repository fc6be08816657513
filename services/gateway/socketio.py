"""Socket.IO v5 on Engine.IO v4 (`engineio.py`): packets, namespaces, events and acks.

Packet text: `<type>[<attachments>-][<namespace>,][<ack id>][<JSON>]`, types 0 CONNECT,
1 DISCONNECT, 2 EVENT, 3 ACK, 4 CONNECT_ERROR, 5 BINARY_EVENT, 6 BINARY_ACK. A binary packet
is followed by its attachments as binary Engine.IO messages; in the JSON each one is a
`{"_placeholder": true, "num": n}`, which `decode` turns back into `bytes`.

`SocketIOServer` is the Engine.IO handler: it admits CONNECTs to the namespaces it has a
`Namespace` for (others get CONNECT_ERROR "Invalid namespace"), closes an Engine.IO session
that sends no CONNECT within `connect_timeout`, and closes any session that sends a malformed
packet. Everything above (events, acks) is the namespace's business.

Binary packets are bounded: a BINARY_EVENT for a namespace the session is not connected to is
refused at once (before its attachments are awaited), the attachments of one packet may hold at
most `max_attachment_bytes` together, and a packet must have them all within
`attachment_timeout`. An unfinished `51-` ... `510-` event kept up to 9 attachments (about
440 KiB) per session before any CONNECT, for as long as pongs kept the session alive: 100 such
sessions from one connection grew the gateway by 43 MiB.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from dataclasses import dataclass, field
from typing import Any, Protocol

from shared.codec import loads_strict

from .engineio_session import EngineSession, Message

log = logging.getLogger(__name__)

CONNECT, DISCONNECT, EVENT, ACK, CONNECT_ERROR, BINARY_EVENT, BINARY_ACK = range(7)
MAX_ATTACHMENTS = 10
CLIENT_NAMESPACE_DISCONNECT = "client namespace disconnect"  # a DISCONNECT packet, not the session's end


class PacketError(ValueError):
    """A malformed Socket.IO packet: its Engine.IO session is closed."""


@dataclass(slots=True)
class Packet:
    type: int
    namespace: str = "/"
    data: Any = None
    ack_id: int | None = None
    attachments: int = 0


def decode(text: str) -> Packet:
    """One packet's text (binary attachments still as placeholders). Raises PacketError."""
    if not text or text[0] not in "0123456":
        raise PacketError("unknown packet type")
    packet = Packet(int(text[0]))
    i = 1
    if packet.type in (BINARY_EVENT, BINARY_ACK):
        dash = text.find("-", i)
        if dash < 0 or not is_ascii_digits(text[i:dash]) or dash - i > 3:
            raise PacketError("bad attachment count")
        packet.attachments = int(text[i:dash])
        if packet.attachments > MAX_ATTACHMENTS:
            raise PacketError("too many attachments")
        i = dash + 1
    if text.startswith("/", i):
        comma = text.find(",", i)
        end = comma if comma >= 0 else len(text)
        packet.namespace = text[i:end]
        i = end + 1 if comma >= 0 else end
    start = i
    while i < len(text) and text[i] in ASCII_DIGITS:
        i += 1
    if i > start:
        if i - start > 15:
            raise PacketError("ack id too long")
        packet.ack_id = int(text[start:i])
    if i < len(text):
        try:
            packet.data = loads_strict(text[i:])
        except ValueError:
            raise PacketError("payload is not JSON") from None
    _check(packet)
    return packet


ASCII_DIGITS = frozenset("0123456789")


def is_ascii_digits(text: str) -> bool:
    """Digits as the protocol means them: `str.isdigit()` is true for "²" and "٣" too."""
    return text != "" and all(c in ASCII_DIGITS for c in text)


def _check(packet: Packet) -> None:
    data = packet.data
    if packet.type == CONNECT:
        if data is not None and not isinstance(data, dict):
            raise PacketError("CONNECT payload must be an object")
    elif packet.type == DISCONNECT:
        if data is not None:
            raise PacketError("DISCONNECT has no payload")
    elif packet.type in (EVENT, BINARY_EVENT):
        if not isinstance(data, list) or not data or not isinstance(data[0], str):
            raise PacketError("EVENT payload must be [name, ...args]")
    elif packet.type in (ACK, BINARY_ACK):
        if not isinstance(data, list) or packet.ack_id is None:
            raise PacketError("ACK needs an id and an array")
    else:  # CONNECT_ERROR comes from servers only
        raise PacketError("CONNECT_ERROR from a client")


def encode(packet: Packet) -> list[Message]:
    """A packet as Engine.IO messages: its text, then any binary attachments."""
    buffers: list[bytes] = []
    data = _deconstruct(packet.data, buffers) if packet.data is not None else None
    kind = packet.type
    if buffers:
        kind = BINARY_EVENT if kind == EVENT else BINARY_ACK if kind == ACK else kind
    text = str(kind)
    if buffers:
        text += f"{len(buffers)}-"
    if packet.namespace != "/":
        text += packet.namespace + ","
    if packet.ack_id is not None:
        text += str(packet.ack_id)
    if data is not None:
        text += json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return [text, *buffers]


def _deconstruct(value: Any, buffers: list[bytes]) -> Any:
    if isinstance(value, bytes | bytearray):
        buffers.append(bytes(value))
        return {"_placeholder": True, "num": len(buffers) - 1}
    if isinstance(value, list):
        return [_deconstruct(v, buffers) for v in value]
    if isinstance(value, dict):
        return {k: _deconstruct(v, buffers) for k, v in value.items()}
    return value


def _reconstruct(value: Any, buffers: list[bytes]) -> Any:
    if isinstance(value, dict):
        if value.get("_placeholder") is True and isinstance(value.get("num"), int):
            num = value["num"]
            if not 0 <= num < len(buffers):
                raise PacketError("placeholder without its attachment")
            return buffers[num]
        return {k: _reconstruct(v, buffers) for k, v in value.items()}
    if isinstance(value, list):
        return [_reconstruct(v, buffers) for v in value]
    return value


class Namespace(Protocol):
    """What a namespace does with its sockets (the gateway, or the conformance echo)."""

    def on_connect(self, socket: Socket, auth: dict[str, Any]) -> None: ...
    def on_event(self, socket: Socket, name: str, args: list[Any], ack_id: int | None, binary: bool) -> None:
        """An EVENT packet (`binary`: a BINARY_EVENT, its attachments as bytes in `args`)."""

    def on_disconnect(self, socket: Socket, reason: str) -> None: ...


@dataclass(slots=True, eq=False)
class Socket:
    """A client's connection to one namespace."""

    session: EngineSession
    namespace: str
    id: str = field(default_factory=lambda: secrets.token_urlsafe(15))
    # The private id of connection-state recovery: a client that got one sends it back, with the
    # offset of the last event it received, when it connects again (socket.io-client only keeps
    # offsets once it has a pid).
    pid: str = field(default_factory=lambda: secrets.token_urlsafe(15))
    data: Any = None  # the namespace's state for this socket

    @property
    def connection_state(self) -> dict[str, Any]:
        """What a namespace keeps for the whole Engine.IO session: it outlives a namespace
        DISCONNECT and CONNECT on the same session (budgets do)."""
        state: _Connection = self.session.data
        return state.namespace_state

    def emit(self, event: str, *args: Any) -> None:
        for message in encode(Packet(EVENT, self.namespace, [event, *args])):
            self.session.send(message)

    def send_event_json(self, event: str, json_text: str, offset: str | None = None) -> None:
        """Emit `event` with one argument already encoded as JSON text: the gateway's frames
        are JSON text, so a Socket.IO frame costs a concatenation, not a re-encode. `offset`
        (digits) is appended as the last argument: the connection-state-recovery offset."""
        prefix = "2" if self.namespace == "/" else f"2{self.namespace},"
        last = "" if offset is None else f',"{offset}"'
        self.session.send(f'{prefix}["{event}",{json_text}{last}]')

    def ack(self, ack_id: int, *args: Any) -> None:
        for message in encode(Packet(ACK, self.namespace, list(args), ack_id=ack_id)):
            self.session.send(message)


@dataclass(slots=True)
class _Connection:
    """Socket.IO state of one Engine.IO session."""

    sockets: dict[str, Socket] = field(default_factory=dict)  # namespace -> socket
    partial: Packet | None = None  # a binary packet waiting for its attachments
    buffers: list[bytes] = field(default_factory=list)
    buffered: int = 0  # bytes in `buffers`
    partial_timer: asyncio.TimerHandle | None = None
    connect_timer: asyncio.TimerHandle | None = None
    namespace_state: dict[str, Any] = field(default_factory=dict)  # see `Socket.connection_state`


class SocketIOServer:
    """The Engine.IO handler of Socket.IO: namespaces by name, each a `Namespace`."""

    def __init__(
        self,
        namespaces: dict[str, Namespace],
        *,
        connect_timeout: float = 45.0,
        max_attachment_bytes: int = 10 * 1024 * 1024,
        attachment_timeout: float = 10.0,
        recovery: bool = False,
    ) -> None:
        self.namespaces = namespaces
        self.connect_timeout = connect_timeout
        self.max_attachment_bytes = max_attachment_bytes
        self.attachment_timeout = attachment_timeout
        self.recovery = recovery  # CONNECT replies carry a `pid` (connection-state recovery)

    def on_open(self, session: EngineSession) -> None:
        state = session.data = _Connection()
        state.connect_timer = asyncio.get_running_loop().call_later(
            self.connect_timeout, self._connect_timed_out, session
        )

    def _connect_timed_out(self, session: EngineSession) -> None:
        state: _Connection = session.data
        if not state.sockets:
            session.close("no CONNECT within the connect timeout")

    def on_message(self, session: EngineSession, message: Message) -> None:
        state: _Connection = session.data
        try:
            if isinstance(message, bytes):
                self._attachment(session, state, message)
                return
            if state.partial is not None:
                raise PacketError("text packet while attachments are awaited")
            packet = decode(message)
            if packet.attachments:
                if packet.namespace not in state.sockets:
                    raise PacketError("a binary packet before CONNECT")
                state.partial, state.buffers, state.buffered = packet, [], 0
                state.partial_timer = asyncio.get_running_loop().call_later(
                    self.attachment_timeout, self._attachments_timed_out, session
                )
                return
            self._dispatch(session, state, packet)
        except PacketError as exc:
            log.debug("socket.io: closing a session (%s)", exc)
            session.close(f"bad packet ({exc})")
        except Exception:  # a bug in a handler: this session ends, nobody else notices
            log.exception("socket.io: unexpected error handling a packet; closing its session")
            session.close("internal error")

    def _attachment(self, session: EngineSession, state: _Connection, data: bytes) -> None:
        if state.partial is None:
            raise PacketError("binary message without a binary packet")
        state.buffered += len(data)
        if state.buffered > self.max_attachment_bytes:
            raise PacketError(f"attachments over {self.max_attachment_bytes} bytes")
        state.buffers.append(data)
        if len(state.buffers) == state.partial.attachments:
            packet, state.partial = state.partial, None
            packet.data = _reconstruct(packet.data, state.buffers)
            state.buffers, state.buffered = [], 0
            if state.partial_timer is not None:
                state.partial_timer.cancel()
                state.partial_timer = None
            self._dispatch(session, state, packet)

    def _attachments_timed_out(self, session: EngineSession) -> None:
        state: _Connection = session.data
        if state.partial is not None:
            session.close(f"a binary packet without its attachments after {self.attachment_timeout:.0f}s")

    def _dispatch(self, session: EngineSession, state: _Connection, packet: Packet) -> None:
        if packet.type == CONNECT:
            self._connect(session, state, packet)
            return
        socket = state.sockets.get(packet.namespace)
        if socket is None:
            raise PacketError(f"packet for namespace {packet.namespace[:40]!r} before CONNECT")
        handler = self.namespaces[packet.namespace]
        if packet.type == DISCONNECT:
            del state.sockets[packet.namespace]
            handler.on_disconnect(socket, CLIENT_NAMESPACE_DISCONNECT)
        elif packet.type in (EVENT, BINARY_EVENT):
            binary = packet.type == BINARY_EVENT
            handler.on_event(socket, packet.data[0], packet.data[1:], packet.ack_id, binary)
        # ACKs from clients: this server never asks for one; ignored

    def _connect(self, session: EngineSession, state: _Connection, packet: Packet) -> None:
        namespace = self.namespaces.get(packet.namespace)
        if namespace is None:
            for message in encode(Packet(CONNECT_ERROR, packet.namespace, {"message": "Invalid namespace"})):
                session.send(message)
            return
        if packet.namespace in state.sockets:
            raise PacketError("CONNECT twice to one namespace")
        socket = Socket(session, packet.namespace)
        state.sockets[packet.namespace] = socket
        if state.connect_timer is not None:
            state.connect_timer.cancel()
            state.connect_timer = None
        reply = {"sid": socket.id, "pid": socket.pid} if self.recovery else {"sid": socket.id}
        for message in encode(Packet(CONNECT, packet.namespace, reply)):
            session.send(message)
        namespace.on_connect(socket, packet.data or {})

    def on_close(self, session: EngineSession, reason: str) -> None:
        state: _Connection | None = session.data
        if state is None:
            return
        for timer in (state.connect_timer, state.partial_timer):
            if timer is not None:
                timer.cancel()
        state.buffers, state.partial = [], None
        for name, socket in list(state.sockets.items()):
            del state.sockets[name]
            try:
                self.namespaces[name].on_disconnect(socket, reason)
            except Exception:
                log.exception("socket.io: disconnect handler failed")
