"""Twilio Media Streams as a client of the gateway, without I/O.

A TwiML ``<Connect><Stream url="wss://…/v1/twilio">`` makes Twilio open a
WebSocket and speak its own protocol: ``connected``, ``start``, then ``media``
every 20 ms, ``dtmf`` on a key press, ``mark`` when playback reaches one of
ours, and ``stop``. :class:`TwilioStream` is the
:class:`gateway.core.wire.ClientProtocol` of such a connection, as
:class:`gateway.core.protocol.Protocol` is of protocol v1 (its
:attr:`~gateway.core.wire.ClientProtocol.phone` is true), and maps it onto
sessions:

* ``start`` is the hello. The caller key is the custom parameter that names
  the caller (``From`` by default; a phone number, or else taken as a user ID)
  plus ``start.callSid``, in the tenant of the ``tenant`` parameter if given.
  A new stream for the same call (new ``streamSid``, same ``callSid``) resumes
  the session; a second stream while the first is open takes it over.
* ``media`` and ``mark`` go to the voice agent as they are, never stored:
  ``{"type": "media", "track", "chunk", "timestamp", "payload"}`` (base64
  μ-law, 8 kHz) and ``{"type": "mark", "name"}``.
* ``dtmf`` is a turn, stored like any other before the agent hears of it:
  ``turn_id`` ``dtmf-{streamSid}-{sequenceNumber}``, the key in ``dtmf``.
* ``stop`` closes the connection with 1000. The session is not ended: Twilio
  sends ``stop`` when the app re-attaches the call to a new stream too.

The agent's ``media``, ``mark`` and ``clear`` frames (:class:`gateway.core.
agent.Media`) go back to Twilio with the current ``streamSid``
(:meth:`TwilioStream.send_media`). Stored agent messages, state frames and
acks have no place in Twilio's protocol and are not sent. Bad input closes the
connection with the same close codes as protocol v1, without an error frame
(Twilio would not read one); other events are ignored, as new ones may come.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Iterable
from typing import Any, ClassVar, Final
from urllib.parse import urlsplit, urlunsplit

from gateway.core import codec
from gateway.core.agent import Media
from gateway.core.callerkey import InvalidCaller, parse_caller
from gateway.core.closecodes import CloseReason, ErrorCode
from gateway.core.events import Forward, Hello, Turn
from gateway.core.session import Session
from gateway.core.wire import ClientProtocol, Phase, Welcome, _Invalid

__all__ = ["MAX_QUEUED_MEDIA", "STREAM_STOPPED", "TwilioStream", "signature", "signature_valid"]

STREAM_STOPPED: Final = CloseReason(1000, "stream stopped", reconnect=False)
"""Twilio sent ``stop``: the stream is over, the session is not."""
MAX_QUEUED_MEDIA: Final = 1500
"""Frames for Twilio queued at most (30 s of 20 ms chunks); more are dropped."""
_MAX_SID = 64


_AUDIO: Final = b'{"event":"media",'
"""How every audio frame queued for Twilio begins (:meth:`TwilioStream.send_media` writes
``event`` first), so that a ``clear`` can pick them out of the outbox."""


class TwilioStream(ClientProtocol):
    """State machine for one Twilio Media Streams connection.

    Args:
        max_message_size: Largest accepted frame, in UTF-8 bytes.
        caller_param: The custom parameter that holds the caller's number.
        default_region: Region for phone numbers written without ``+``.
    """

    phone: ClassVar[bool] = True
    _KIND_FIELD = "event"
    _NOT_AN_OBJECT = _KIND_NOT_A_STRING = "a frame must be an object with a string event"

    def __init__(
        self, *, max_message_size: int, caller_param: str = "From", default_region: str | None
    ) -> None:
        super().__init__(max_message_size=max_message_size, default_region=default_region)
        self.caller_param = caller_param
        self.stream_sid: str | None = None
        self._queued_media = 0
        """Audio frames in the outbox, bounded by :data:`MAX_QUEUED_MEDIA`."""

    # Receiving

    def receive_binary(self, data: bytes) -> None:
        """Refuse a binary frame: Twilio sends JSON text only."""
        if self.phase is not Phase.CLOSED:
            self.fail(ErrorCode.UNSUPPORTED_DATA, "binary frames are not part of Media Streams")

    def _parse(self, data: str) -> Hello | Turn | Forward | None:
        msg, event = self._decode(data)
        if event == "connected":
            return None
        if event == "start":
            if self.phase is not Phase.AWAIT_HELLO:
                raise _Invalid(ErrorCode.UNEXPECTED_MESSAGE, "a second start on one stream")
            hello = self._start(msg)
            self.phase = Phase.RESTORING
            return hello
        if event not in ("media", "dtmf", "mark", "stop"):
            return None  # a newer event than we know: Twilio's protocol grows
        if self.phase is Phase.AWAIT_HELLO:
            raise _Invalid(ErrorCode.UNEXPECTED_MESSAGE, f"'{event}' before start")
        if self.phase is Phase.RESTORING and event != "stop":
            # Only seen when the driver gave up on the hello (Twilio hung up meanwhile) and
            # reads what was already buffered: nothing to act on.
            return None
        if event == "media":
            return Forward(self._media(msg))
        if event == "mark":
            name = _string(_object(msg, "mark"), "name", 256)
            return Forward(codec.dumps({"type": "mark", "name": name}))
        if event == "dtmf":
            digit = _string(_object(msg, "dtmf"), "digit", 1)
            number = _number(msg, "sequenceNumber")
            return Turn(f"dtmf-{self.stream_sid}-{number}", None, None, None, dtmf=digit)
        self.close(STREAM_STOPPED)
        return None

    def media_now(self, data: str) -> bytes | None:
        """The agent's frame for ``data`` if it is a caller's audio on an open stream, for
        a driver that relays audio as it is read; ``None`` for anything else (and for bad
        audio), which :meth:`receive_text` is then given, as if this had not been called."""
        if self.phase is not Phase.OPEN:
            return None
        try:
            msg, event = self._decode(data)
            return self._media(msg) if event == "media" else None
        except _Invalid:
            return None

    def _media(self, msg: dict[str, Any]) -> bytes:
        media = _object(msg, "media")
        return codec.dumps(
            {
                "type": "media",
                "track": _string(media, "track", 32),
                "chunk": _number(media, "chunk"),
                "timestamp": _number(media, "timestamp"),
                "payload": _string(media, "payload", self.max_message_size),
            }
        )

    def _start(self, msg: dict[str, Any]) -> Hello:
        start = _object(msg, "start")
        call_sid = _string(start, "callSid", _MAX_SID)
        self.stream_sid = _string(start, "streamSid", _MAX_SID)
        params = _parameters(start.get("customParameters"))
        who = params.get(self.caller_param)
        if not isinstance(who, str) or not who:
            raise _Invalid(
                ErrorCode.INVALID_CALLER,
                f"start.customParameters has no {self.caller_param!r}: add "
                f'<Parameter name="{self.caller_param}" value="..."/> to the <Stream>',
            )
        tenant = params.get("tenant")
        try:
            try:
                caller = parse_caller(
                    {"phone": who, "call_id": call_sid},
                    tenant,
                    default_region=self.default_region,
                )
            except InvalidCaller as exc:
                if exc.code != "phone":
                    raise
                # client:alice, sip:…, anonymous: not a number, still a caller.
                caller = parse_caller({"user_id": who, "call_id": call_sid}, tenant)
        except InvalidCaller as exc:
            raise _Invalid(ErrorCode.INVALID_CALLER, f"caller {exc}") from None
        self.stream = {
            "provider": "twilio",
            "stream_sid": self.stream_sid,
            "call_sid": call_sid,
            "account_sid": _optional_string(start, "accountSid", _MAX_SID),
            "tracks": _tracks(start.get("tracks")),
            "media_format": _media_format(start.get("mediaFormat")),
            "custom_parameters": params,
        }
        return Hello(caller, None, None)

    # Sending

    def send_welcome(self, welcome: Welcome) -> None:
        """The session is open; Twilio is told nothing (the agent is, on its link)."""
        if self.phase is not Phase.CLOSED:
            self.phase = Phase.OPEN

    def send_msg(self, seq: int, data: bytes) -> None:
        """A stored agent message: Twilio has no place for it."""

    def send_state(self, session: Session) -> None:
        """A state change: Twilio has no place for it."""

    def send_ack(self, turn_id: str, version: int) -> None:
        """A turn (a key press) is durable: Twilio expects no answer."""

    def send_nack(self, turn_id: str, code: ErrorCode, message: str, *, retry_after: float) -> None:
        """A turn (a key press) was not stored: Twilio cannot send it again, so it is lost,
        and the call goes on."""

    def send_media(self, media: Media) -> bool:
        """Queue the agent's audio, mark or clear for Twilio, with this stream's ``streamSid``.

        A ``clear`` also drops the audio still queued here: the agent wants it unheard.
        Returns ``False`` (nothing queued) unless open, or for audio when
        :data:`MAX_QUEUED_MEDIA` frames of it already wait for a slow Twilio.
        """
        if self.phase is not Phase.OPEN:
            return False
        frame: dict[str, Any] = {"event": media.kind, "streamSid": self.stream_sid}
        if media.kind == "media":
            if self._queued_media >= MAX_QUEUED_MEDIA:
                return False
            self._queued_media += 1
            frame["media"] = {"payload": media.value}
        elif media.kind == "mark":
            frame["mark"] = {"name": media.value}
        else:
            self._outbox = [item for item in self._outbox if not item.startswith(_AUDIO)]
            self._queued_media = 0
            self.buffered = sum(len(item) for item in self._outbox)
        self._queue(codec.dumps(frame))
        return True

    def _send_error(
        self, code: ErrorCode, message: str, reason: CloseReason, *, retry_after: float | None
    ) -> None:
        """Send nothing: Twilio reads no error frame, and re-attaches through the app, not
        by itself. The driver logs :attr:`error_message` instead."""

    def data_to_send(self) -> list[bytes]:
        """Return and forget the frames queued since the last call."""
        self._queued_media = 0
        return super().data_to_send()


def _object(msg: dict[str, Any], name: str) -> dict[str, Any]:
    value = msg.get(name)
    if not isinstance(value, dict):
        raise _Invalid(ErrorCode.INVALID_MESSAGE, f"field {name!r} must be an object")
    return value


def _string(msg: dict[str, Any], name: str, limit: int) -> str:
    value = msg.get(name)
    if not isinstance(value, str) or not 0 < len(value) <= limit:
        raise _Invalid(
            ErrorCode.INVALID_MESSAGE, f"field {name!r} must be a string of 1 to {limit} characters"
        )
    return value


def _optional_string(msg: dict[str, Any], name: str, limit: int) -> str | None:
    return None if msg.get(name) is None else _string(msg, name, limit)


_MAX_PARAMETERS = 32
_MAX_PARAMETER_NAME = 128
_MAX_PARAMETER_VALUE = 1024
_TRACKS: Final = frozenset(
    {"inbound", "outbound", "inbound_track", "outbound_track", "both_tracks"}
)
_MEDIA_FORMAT: Final = {"encoding": str, "sampleRate": int, "channels": int}


def _parameters(value: Any) -> dict[str, str]:
    """``start.customParameters``: what the TwiML's ``<Parameter>`` elements said, which
    Twilio sends as strings. Checked here, before any of it is copied to the agent: at most
    :data:`_MAX_PARAMETERS` names, each a string, as is each value, of bounded length."""
    if value is None:
        return {}
    if not isinstance(value, dict) or len(value) > _MAX_PARAMETERS:
        raise _Invalid(
            ErrorCode.INVALID_MESSAGE,
            f"start.customParameters must be an object of at most {_MAX_PARAMETERS} strings",
        )
    for name, text in value.items():
        if not 0 < len(name) <= _MAX_PARAMETER_NAME or not (
            isinstance(text, str) and len(text) <= _MAX_PARAMETER_VALUE
        ):
            raise _Invalid(
                ErrorCode.INVALID_MESSAGE,
                f"a custom parameter must be a string of at most {_MAX_PARAMETER_VALUE}"
                f" characters, named in 1 to {_MAX_PARAMETER_NAME}",
            )
    return value


def _tracks(value: Any) -> list[str] | None:
    """``start.tracks``: which tracks the stream carries, from Twilio's short list."""
    if value is None:
        return None
    if (
        not isinstance(value, list)
        or len(value) > len(_TRACKS)
        or not all(isinstance(track, str) and track in _TRACKS for track in value)
    ):
        raise _Invalid(
            ErrorCode.INVALID_MESSAGE, f"start.tracks must list some of {sorted(_TRACKS)}"
        )
    return value


def _media_format(value: Any) -> dict[str, Any] | None:
    """``start.mediaFormat``: encoding, sample rate and channels; other fields are dropped."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _Invalid(ErrorCode.INVALID_MESSAGE, "start.mediaFormat must be an object")
    out: dict[str, Any] = {}
    for name, kind in _MEDIA_FORMAT.items():
        field = value.get(name)
        if field is None:
            continue
        if kind is str:
            out[name] = _string(value, name, 32)
        elif isinstance(field, int) and not isinstance(field, bool) and 0 < field <= 1_000_000:
            out[name] = field
        else:
            raise _Invalid(
                ErrorCode.INVALID_MESSAGE, f"start.mediaFormat.{name} must be 1 to 1000000"
            )
    return out


def _number(msg: dict[str, Any], name: str) -> int:
    """Twilio writes counters as decimal strings (``"chunk": "3"``)."""
    value = msg.get(name)
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        return int(value)
    raise _Invalid(ErrorCode.INVALID_MESSAGE, f"field {name!r} must be a decimal string")


# The upgrade request's signature


def signature(auth_token: str, url: str) -> str:
    """Twilio's ``X-Twilio-Signature`` for a WebSocket to ``url``: base64 HMAC-SHA1 of the URL.

    A WebSocket upgrade is a GET, so no POST parameters are appended.
    """
    mac = hmac.new(auth_token.encode(), url.encode(), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode()


def signature_valid(auth_tokens: Iterable[str], url: str, header: str | None) -> bool:
    """Whether ``header`` is Twilio's signature of ``url`` under one of ``auth_tokens``.

    ``url`` is tried as given and, as Twilio's own validators do, with the
    scheme's default port added or removed: Twilio signs the URL as written in
    the TwiML, and a proxy may report it either way.
    """
    if not header:
        return False
    candidates = _port_variants(url)
    return any(
        hmac.compare_digest(signature(token, candidate).encode(), header.encode())
        for token in auth_tokens
        for candidate in candidates
    )


_DEFAULT_PORTS: Final = {"wss": 443, "https": 443, "ws": 80, "http": 80}


def _port_variants(url: str) -> list[str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # from a Host header such as "x:abc", "x:99999" or "[::1"
        return [url]
    default = _DEFAULT_PORTS.get(parts.scheme)
    host = parts.hostname
    if default is None or host is None or "@" in parts.netloc:
        return [url]
    if ":" in host:
        host = f"[{host}]"
    if port is None:
        other = parts._replace(netloc=f"{host}:{default}")
    elif port == default:
        other = parts._replace(netloc=host)
    else:
        return [url]
    return [url, urlunsplit(other)]
