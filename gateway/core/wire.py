"""What every client protocol has in common, without I/O.

A client connection speaks one of two protocols: protocol v1, JSON frames from
browsers and apps (:class:`gateway.core.protocol.Protocol`), or Twilio Media
Streams from a phone call (:class:`gateway.core.twilio.TwilioStream`). Both are
a :class:`ClientProtocol`, so the transport drives them the same way: it feeds
every frame to :meth:`~ClientProtocol.receive_text` or
:meth:`~ClientProtocol.receive_binary`, acts on the event it gets back,
answers with the ``send_*`` methods, writes what
:meth:`~ClientProtocol.data_to_send` returns and, once
:attr:`~ClientProtocol.close_reason` is set, closes with it. Where the two
must be treated differently it asks :attr:`ClientProtocol.phone`, never the
class.

The base holds what they share: the phases, the first checks on every text
frame (size, JSON, an object that names its kind), the outbox, and ``fail``
and ``close``. Neither raises on client input: a bad frame fails the
connection, and every frame after that is ignored.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass
from typing import Any, ClassVar

from gateway.core import codec
from gateway.core.agent import Media
from gateway.core.closecodes import ERRORS, CloseReason, ErrorCode
from gateway.core.events import Event, Forward
from gateway.core.session import Session
from gateway.exceptions import InvalidInput

__all__ = ["ClientProtocol", "Phase", "Welcome"]


class Phase(enum.Enum):
    """Where a connection stands in its protocol."""

    AWAIT_HELLO = "await_hello"
    RESTORING = "restoring"
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True, slots=True)
class Welcome:
    """What a client is told when its session opens (or, degraded, opens again)."""

    session: Session
    resumed: bool = False
    stale: bool = False
    replay_from: int | None = None
    """The first sequence number still held, when the client missed older messages that
    are gone (``"replay": "partial"``)."""
    degraded: bool = False
    """The store is unreachable: the session is new and held here only, and turns wait
    until a welcome without ``degraded`` follows."""


class _Invalid(InvalidInput):
    """A client frame is refused with ``code``; caught in :meth:`ClientProtocol.receive_text`,
    never raised out of it."""

    code: ErrorCode

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(code, message)


class ClientProtocol(abc.ABC):
    """State machine for one client connection, whichever protocol it speaks.

    Args:
        max_message_size: Largest accepted frame, in UTF-8 bytes.
        default_region: Region for phone numbers written without ``+``.
    """

    phone: ClassVar[bool]
    """Whether the client is a phone call's media stream. A phone stream is not
    token-authenticated (the upgrade's signature stands for it), is never shed
    by admission (the caller cannot retry), gets the agent's audio, marks and
    clears (:meth:`send_media`), and gets no error frame, so its errors are logged."""

    _KIND_FIELD: ClassVar[str]
    """The field that names a frame's kind: ``type`` or ``event``."""
    _NOT_AN_OBJECT: ClassVar[str]
    """The error message for a frame that is JSON but not an object."""
    _KIND_NOT_A_STRING: ClassVar[str]
    """The error message for an object whose :attr:`_KIND_FIELD` is not a string."""

    def __init__(self, *, max_message_size: int, default_region: str | None) -> None:
        self.max_message_size = max_message_size
        self.default_region = default_region
        self.phase = Phase.AWAIT_HELLO
        self.close_reason: CloseReason | None = None
        """Set once the connection must close; the driver closes with it."""
        self.error_code: ErrorCode | None = None
        """The code of the error that closed the connection, if any (for metrics)."""
        self.error_message: str | None = None
        """Why the connection was closed for an error, if it was: the error frame's
        message, and for a phone stream, which gets none, the only record of it."""
        self.stream: dict[str, Any] | None = None
        """A phone stream's description for the agent (what it said when it started);
        ``None`` before that, and always on protocol v1."""
        self._outbox: list[bytes] = []
        self.buffered = 0
        """Bytes of the frames queued and not yet taken by :meth:`data_to_send`."""

    # Receiving

    def receive_text(self, data: str) -> Event | Forward | None:
        """Parse one text frame; return what the driver must act on, if anything.

        A bad frame fails the connection instead; once closed, frames are ignored.
        """
        if self.phase is Phase.CLOSED:
            return None
        try:
            return self._parse(data)
        except _Invalid as exc:
            self.fail(exc.code, exc.message)
            return None

    @abc.abstractmethod
    def receive_binary(self, data: bytes) -> None:
        """Refuse a binary frame: both protocols are JSON text only."""

    @abc.abstractmethod
    def _parse(self, data: str) -> Event | Forward | None:
        """Turn a text frame into what it means; raise :class:`_Invalid` if it is bad."""

    def _decode(self, data: str) -> tuple[dict[str, Any], str]:
        """Check what every frame must be: within the size limit, JSON, an object whose
        :attr:`_KIND_FIELD` is a string. Return the object and its kind."""
        size = len(data)
        # A character is at most 4 UTF-8 bytes: most frames need no encoding to measure.
        if size > self.max_message_size or (
            size * 4 > self.max_message_size and len(data.encode()) > self.max_message_size
        ):
            raise _Invalid(
                ErrorCode.MESSAGE_TOO_BIG, f"frames are limited to {self.max_message_size} bytes"
            )
        try:
            msg = codec.loads(data)
        except codec.DecodeError as exc:
            raise _Invalid(ErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc}") from None
        if not isinstance(msg, dict):
            raise _Invalid(ErrorCode.INVALID_MESSAGE, self._NOT_AN_OBJECT)
        kind = msg.get(self._KIND_FIELD)
        if not isinstance(kind, str):
            raise _Invalid(ErrorCode.INVALID_MESSAGE, self._KIND_NOT_A_STRING)
        return msg, kind

    # Sending

    @abc.abstractmethod
    def send_welcome(self, welcome: Welcome) -> None:
        """Answer the hello: the session is open (nothing once closed)."""

    @abc.abstractmethod
    def send_msg(self, seq: int, data: bytes) -> None:
        """Pass on a stored agent message: ``data`` is its JSON."""

    @abc.abstractmethod
    def send_state(self, session: Session) -> None:
        """Pass on the session's state after the agent changed it."""

    @abc.abstractmethod
    def send_ack(self, turn_id: str, version: int) -> None:
        """Acknowledge a turn that is durable at ``version``."""

    @abc.abstractmethod
    def send_nack(self, turn_id: str, code: ErrorCode, message: str, *, retry_after: float) -> None:
        """Say that a turn was not applied; the connection stays open."""

    @abc.abstractmethod
    def send_media(self, media: Media) -> bool:
        """Queue the agent's audio, mark or clear for a phone stream; return whether it was."""

    def fail(self, code: ErrorCode, message: str, *, retry_after: float | None = None) -> None:
        """Record the error ``code`` and close with its close reason (nothing once closed).

        Args:
            retry_after: Seconds the client should wait before it reconnects.
        """
        if self.phase is Phase.CLOSED:
            return
        reason = ERRORS[code]
        self._send_error(code, message, reason, retry_after=retry_after)
        self.error_code = code
        self.error_message = message
        self.close(reason)

    @abc.abstractmethod
    def _send_error(
        self, code: ErrorCode, message: str, reason: CloseReason, *, retry_after: float | None
    ) -> None:
        """Tell the client about the error ahead of the close, if its protocol can."""

    def close(self, reason: CloseReason) -> None:
        """Close with ``reason`` after the frames queued so far."""
        if self.phase is not Phase.CLOSED:
            self.close_reason = reason
            self.phase = Phase.CLOSED

    @property
    def queued(self) -> int:
        """Frames queued and not yet taken by :meth:`data_to_send`."""
        return len(self._outbox)

    def data_to_send(self) -> list[bytes]:
        """Return and forget the frames queued since the last call."""
        out, self._outbox, self.buffered = self._outbox, [], 0
        return out

    def _queue(self, frame: bytes) -> None:
        self._outbox.append(frame)
        self.buffered += len(frame)
