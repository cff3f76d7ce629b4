"""Protocol v1 between a client and the gateway, without I/O.

Theory of operation
-------------------

One :class:`Protocol` object per protocol v1 connection: the
:class:`gateway.core.wire.ClientProtocol` of browsers and apps, as
:class:`gateway.core.twilio.TwilioStream` is of phone streams. The I/O layer
(:mod:`gateway.transport.client_ws`) feeds it every frame it receives with
:meth:`Protocol.receive_text` or :meth:`Protocol.receive_binary` and gets back
at most one event (:class:`Hello`, :class:`Turn`, :class:`Bye`). It acts on the
event (restore, write a snapshot) and reports the result with ``send_*``
methods, which queue frames. After each step it writes what
:meth:`Protocol.data_to_send` returns and, once :attr:`Protocol.close_reason`
is set, closes the connection with it.

The protocol never raises on client input: a bad frame queues an ``error``
frame, sets the close reason and moves to ``CLOSED``, after which every further
frame is ignored (like websockets' ``Protocol.parse``).

Phases and what each accepts (anything else is ``unexpected_message``)::

    AWAIT_HELLO --hello--> RESTORING --send_welcome()--> OPEN --bye--> CLOSED
                                     --fail()---------> CLOSED
                 OPEN --turn--> OPEN  (the driver answers each with send_ack, or with
                                       send_nack when the store could not take it)
                 OPEN --send_welcome()--> OPEN  (a degraded session found its store again)
                 OPEN --ack---> OPEN  (the client received messages up to a seq)
                 any but CLOSED --ping--> same phase, a ``pong`` queued (the heartbeat of
                                          clients that cannot send WebSocket pings: browsers)
                 any  --fail()/close()--> CLOSED

Besides answers, the driver queues the voice agent's messages with
:meth:`Protocol.send_msg` (each with its sequence number, replayed ones first)
and state changes with :meth:`Protocol.send_state`, in OPEN only.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar, Final

from gateway.core import codec
from gateway.core.agent import Media
from gateway.core.callerkey import InvalidCaller, parse_caller
from gateway.core.closecodes import ERRORS, CloseReason, ErrorCode
from gateway.core.events import Ack, Bye, Event, Hello, Turn
from gateway.core.session import Session
from gateway.core.wire import ClientProtocol, Phase, Welcome, _Invalid

__all__ = ["ERRORS", "MAX_INT", "PROTOCOL_VERSION", "Phase", "Protocol"]
# ERRORS (from closecodes) and Phase (from wire) are exported here too, where they began.

PROTOCOL_VERSION: Final = 1

_MAX_ID = 128
_MAX_TOKEN = 256
_MAX_AUTH_TOKEN = 8192
MAX_INT: Final = 2**53 - 1
"""Largest integer a client may send (``last_seq``, an ack's ``seq``): the largest that
JavaScript, Lua and the stores' scripts all hold exactly. Checked here, at the edge."""


# Which message types each phase accepts (h11-style transition table).
_ACCEPTS: Final[Mapping[Phase, frozenset[str]]] = {
    Phase.AWAIT_HELLO: frozenset({"hello", "ping"}),
    Phase.RESTORING: frozenset({"ping"}),
    Phase.OPEN: frozenset({"turn", "ack", "bye", "ping"}),
    Phase.CLOSED: frozenset(),
}
_KNOWN_TYPES: Final = frozenset({"hello", "turn", "ack", "bye", "ping"})
_PONG: Final = codec.dumps({"type": "pong"})


class Protocol(ClientProtocol):
    """State machine for one protocol v1 connection.

    A ``ping`` is answered here, with a ``pong``: :meth:`receive_text` returns
    ``None`` for it.

    Args:
        max_message_size: Largest accepted frame, in UTF-8 bytes.
        default_region: Region for phone numbers written without ``+``.
    """

    phone: ClassVar[bool] = False
    _KIND_FIELD = "type"
    _NOT_AN_OBJECT = "a message must be a JSON object"
    _KIND_NOT_A_STRING = "field 'type' must be a string"

    def __init__(self, *, max_message_size: int, default_region: str | None = None) -> None:
        super().__init__(max_message_size=max_message_size, default_region=default_region)

    # Receiving

    def receive_binary(self, data: bytes) -> None:
        """Refuse a binary frame: protocol v1 is JSON text frames only."""
        if self.phase is not Phase.CLOSED:
            self.fail(ErrorCode.UNSUPPORTED_DATA, "binary frames are not accepted; send JSON text")

    def _parse(self, data: str) -> Event | None:
        msg, kind = self._decode(data)
        if kind not in _KNOWN_TYPES:
            raise _Invalid(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind[:40]!r}")
        if kind not in _ACCEPTS[self.phase]:
            raise _Invalid(
                ErrorCode.UNEXPECTED_MESSAGE, f"'{kind}' is not allowed in phase {self.phase.value}"
            )
        if kind == "ping":
            self._queue(_PONG)
            return None
        if kind == "hello":
            event: Event = self._hello(msg)
            self.phase = Phase.RESTORING
        elif kind == "turn":
            event = self._turn(msg)
        elif kind == "ack":
            event = self._ack(msg)
        else:
            event = Bye()
        return event

    def now(self, data: str) -> Turn | Ack | None:
        """The turn or ack in ``data`` if it is a valid one on an open connection, for a
        driver that acts on frames as they are read; ``None`` for anything else (and for
        a bad turn or ack), which :meth:`receive_text` is then given, as if this had not
        been called."""
        if self.phase is not Phase.OPEN:
            return None
        try:
            msg, kind = self._decode(data)
            if kind == "turn":
                return self._turn(msg)
            return self._ack(msg) if kind == "ack" else None
        except _Invalid:
            return None

    @staticmethod
    def _ack(msg: dict[str, Any]) -> Ack:
        seq = msg.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_INT:
            raise _Invalid(
                ErrorCode.INVALID_MESSAGE, f"field 'seq' must be an integer from 0 to {MAX_INT}"
            )
        return Ack(seq)

    def _hello(self, msg: dict[str, Any]) -> Hello:
        token = _optional(msg, "resume_token", str)
        if token is not None and not 0 < len(token) <= _MAX_TOKEN:
            raise _Invalid(ErrorCode.INVALID_MESSAGE, "field 'resume_token' has a bad length")
        auth = _optional(msg, "token", str)
        if auth is not None and not 0 < len(auth) <= _MAX_AUTH_TOKEN:
            raise _Invalid(ErrorCode.INVALID_MESSAGE, "field 'token' has a bad length")
        last_seq = _optional(msg, "last_seq", int)
        if last_seq is not None and not 0 <= last_seq <= MAX_INT:
            raise _Invalid(
                ErrorCode.INVALID_MESSAGE,
                f"field 'last_seq' must be an integer from 0 to {MAX_INT}",
            )
        if "caller" not in msg:
            raise _Invalid(ErrorCode.INVALID_MESSAGE, "field 'caller' is required")
        try:
            caller = parse_caller(
                msg["caller"], msg.get("tenant"), default_region=self.default_region
            )
        except InvalidCaller as exc:
            raise _Invalid(ErrorCode.INVALID_CALLER, f"caller {exc}") from None
        return Hello(caller, token, last_seq, auth)

    def _turn(self, msg: dict[str, Any]) -> Turn:
        turn_id = msg.get("turn_id")
        if not isinstance(turn_id, str) or not 0 < len(turn_id) <= _MAX_ID:
            raise _Invalid(
                ErrorCode.INVALID_MESSAGE,
                f"field 'turn_id' must be a non-empty string of at most {_MAX_ID} characters",
            )
        form = _optional(msg, "form", dict)
        context = _optional(msg, "context", dict)
        for name, value in (("form", form), ("context", context)):
            if value is not None and codec.too_deep(value, codec.MAX_DEPTH):
                raise _Invalid(
                    ErrorCode.INVALID_MESSAGE, f"field '{name}' nests deeper than {codec.MAX_DEPTH}"
                )
        return Turn(turn_id, _optional(msg, "text", str), form, context)

    # Sending

    def send_welcome(self, welcome: Welcome) -> None:
        """Answer the hello: the session is open (nothing once closed). A second welcome
        on the same connection replaces what the first said."""
        if self.phase is Phase.CLOSED:
            return
        session, replay_from = welcome.session, welcome.replay_from
        frame: dict[str, Any] = {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "session_id": session.session_id,
            "resumed": welcome.resumed,
            "state": session.state,
            "version": session.version,
            "seq": session.seq,
            "replay": "full" if replay_from is None else "partial",
            "resume_token": session.resume_token,
        }
        if replay_from is not None:
            frame["replay_from"] = replay_from
        if welcome.stale:
            frame["stale"] = True
        if welcome.degraded:
            frame["degraded"] = True
        self._queue(codec.dumps(frame))
        self.phase = Phase.OPEN

    def send_msg(self, seq: int, data: bytes) -> None:
        """Queue an agent message: ``data`` is its JSON, sent as is (nothing unless open)."""
        if self.phase is Phase.OPEN:
            self._queue(b'{"type":"msg","seq":%d,"data":%b}' % (seq, data))

    def send_state(self, session: Session) -> None:
        """Queue the session's state after the agent changed it (nothing unless open)."""
        if self.phase is Phase.OPEN:
            self._queue(
                codec.dumps({"type": "state", "version": session.version, "state": session.state})
            )

    def send_ack(self, turn_id: str, version: int) -> None:
        """Acknowledge a turn that is durable at ``version`` (nothing once closed).

        A connection closed meanwhile (replaced, failed) sends nothing after its
        error frame; the client re-sends the turn and gets its ack then.
        """
        if self.phase is Phase.CLOSED:
            return
        self._queue(codec.dumps({"type": "ack", "turn_id": turn_id, "version": version}))

    def send_nack(self, turn_id: str, code: ErrorCode, message: str, *, retry_after: float) -> None:
        """Say that a turn was not applied and should be sent again after ``retry_after``
        seconds; the connection stays open (nothing once closed)."""
        if self.phase is Phase.CLOSED:
            return
        self._queue(
            codec.dumps(
                {
                    "type": "nack",
                    "turn_id": turn_id,
                    "code": code,
                    "message": message,
                    "retry_after": retry_after,
                }
            )
        )

    def send_media(self, media: Media) -> bool:
        """Queue nothing: protocol v1 never carries a phone call's audio."""
        return False

    def _send_error(
        self, code: ErrorCode, message: str, reason: CloseReason, *, retry_after: float | None
    ) -> None:
        """Queue the ``error`` frame that tells the client why it is closed and whether to
        reconnect (and when, with ``retry_after``)."""
        frame: dict[str, Any] = {
            "type": "error",
            "code": code,
            "message": message,
            "close_code": reason.code,
            "reconnect": reason.reconnect,
        }
        if retry_after is not None:
            frame["retry_after"] = retry_after
        self._queue(codec.dumps(frame))


def _optional(msg: dict[str, Any], name: str, kind: type) -> Any:
    value = msg.get(name)
    # bool is an int subclass; {"last_seq": true} is not a number.
    if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
        raise _Invalid(ErrorCode.INVALID_MESSAGE, f"field '{name}' must be {_TYPE_NAMES[kind]}")
    return value


_TYPE_NAMES: Final[Mapping[type, str]] = {str: "a string", int: "an integer", dict: "an object"}
