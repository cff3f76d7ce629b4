"""The downstream protocol between the gateway and a voice agent, without I/O.

The gateway opens one WebSocket to the agent per live session and sends JSON
text frames::

    {"type": "session.start",  "session_id", "caller", "state", "version"}
    {"type": "session.resume", "session_id", "caller", "state", "version", "reason"}
    {"type": "turn", "session_id", "turn_id", "text"?, "form"?, "context"?, "dtmf"?, "version"}
    {"type": "session.end", "session_id"}
    {"type": "error", "code", "message"}      (a frame of the agent's was rejected)
    {"type": "media", "track", "chunk", "timestamp", "payload"}   (a phone caller's audio)
    {"type": "mark", "name"}                   (the phone played up to the agent's mark)

``session.start`` opens a new session; ``session.resume`` follows every
restore (``reason``: ``client_resumed``) and every redial of a dropped agent
link (``agent_reconnected``), with the state as it stands, and the phone
stream in ``stream`` when the client is one (:mod:`gateway.core.twilio`). A
turn is sent once it is durable; ``media`` and ``mark`` are relayed as they
come and never stored.

The agent sends JSON objects with a string ``type``. ``{"type": "state",
"patch": {...}}`` changes the session state (see :func:`parse_frame`).
In a phone call's session, ``media`` (``payload``: base64 audio), ``mark``
(``name``) and ``clear`` are for the caller's stream: relayed at once, never
stored or numbered (:class:`Media`). Any other object is a message for the client, relayed as the
``data`` of a sequenced ``msg`` frame. A bad frame is rejected with an
``error`` frame back to the agent and never reaches the client or the store.
"""

from __future__ import annotations

import binascii
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

from gateway.core import codec
from gateway.core.callerkey import CallerKey
from gateway.core.events import Turn
from gateway.core.session import PATCHABLE, Session
from gateway.exceptions import InvalidInput

__all__ = [
    "AGENT_ERRORS",
    "AgentErrorCode",
    "AgentMessage",
    "InvalidAgentFrame",
    "Media",
    "StatePatch",
    "caller_object",
    "error_frame",
    "parse_frame",
    "session_end",
    "session_open",
    "turn_frame",
]


class AgentErrorCode(enum.StrEnum):
    """Why the gateway rejects an agent frame: the ``code`` of the ``error`` frame the agent
    gets back, and a metrics label. Not :class:`gateway.core.closecodes.ErrorCode`: the
    agent's link is not closed for a bad frame, and a few codes are the agent's own."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNSUPPORTED_DATA = "unsupported_data"
    MESSAGE_TOO_BIG = "message_too_big"
    INVALID_PATCH = "invalid_patch"
    INVALID_MEDIA = "invalid_media"
    STATE_TOO_BIG = "state_too_big"


AGENT_ERRORS: Final[Mapping[AgentErrorCode, str]] = {
    AgentErrorCode.INVALID_JSON: "the frame is not JSON",
    AgentErrorCode.INVALID_MESSAGE: "the frame is not an object with a string type",
    AgentErrorCode.UNSUPPORTED_DATA: "the frame is binary",
    AgentErrorCode.MESSAGE_TOO_BIG: "the frame is larger than the limit",
    AgentErrorCode.INVALID_PATCH: "a state patch has the wrong shape",
    AgentErrorCode.INVALID_MEDIA: "a media, mark or clear frame has the wrong shape",
    AgentErrorCode.STATE_TOO_BIG: "a state patch would grow the state past the limit",
}
"""Every reason the gateway rejects an agent frame, explained."""


class InvalidAgentFrame(InvalidInput, ValueError):
    """An agent frame the gateway rejects, with the code the agent is told."""

    code: AgentErrorCode

    def __init__(self, code: AgentErrorCode, message: str) -> None:
        super().__init__(code, message)


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """A message for the client: ``data`` is the agent's frame as JSON."""

    data: bytes


@dataclass(frozen=True, slots=True)
class Media:
    """Audio, a mark or a clear for a phone caller's stream: relayed, never stored.

    ``value`` is the base64 payload of ``media``, the name of a ``mark``, and
    empty for ``clear``.
    """

    kind: Literal["media", "mark", "clear"]
    value: str


@dataclass(frozen=True, slots=True)
class StatePatch:
    """A change to ``form_answers`` and ``context``; ``null`` deletes a key."""

    patch: dict[str, dict[str, Any]]


def parse_frame(
    data: str | bytes, *, max_size: int, phone: bool = False
) -> AgentMessage | StatePatch | Media:
    """Check one frame from the agent.

    Args:
        phone: The session is a phone call's: ``media``, ``mark`` and ``clear``
            are :class:`Media` for its stream. Otherwise they are messages like
            any other, as they were before phone streams existed.

    Raises:
        InvalidAgentFrame: If the frame is binary, too big, not a JSON object
            with a string ``type``, a ``state`` frame whose ``patch`` is not an
            object of objects keyed by ``form_answers`` or ``context``, a
            ``media`` frame whose ``payload`` is not base64, or a ``mark``
            without a string ``name``.
    """
    if isinstance(data, bytes):
        raise InvalidAgentFrame(
            AgentErrorCode.UNSUPPORTED_DATA, "binary frames are not relayed; send JSON"
        )
    raw = data.encode()
    if len(raw) > max_size:
        raise InvalidAgentFrame(
            AgentErrorCode.MESSAGE_TOO_BIG, f"frames are limited to {max_size} bytes"
        )
    try:
        msg = codec.loads(raw)
    except codec.DecodeError as exc:
        raise InvalidAgentFrame(
            AgentErrorCode.INVALID_JSON, f"frame is not valid JSON: {exc}"
        ) from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise InvalidAgentFrame(
            AgentErrorCode.INVALID_MESSAGE, "a frame must be an object with a string type"
        )
    kind = msg["type"]
    if phone and kind in ("media", "mark", "clear"):
        return _media(kind, msg)
    if kind != "state":
        if codec.too_deep(msg, codec.MAX_DEPTH):
            raise InvalidAgentFrame(
                AgentErrorCode.INVALID_MESSAGE, f"the frame nests deeper than {codec.MAX_DEPTH}"
            )
        return AgentMessage(raw)
    patch = msg.get("patch")
    if not isinstance(patch, dict) or not patch:
        raise InvalidAgentFrame(
            AgentErrorCode.INVALID_PATCH, "field 'patch' must be a non-empty object"
        )
    for name, changes in patch.items():
        if name not in PATCHABLE:
            raise InvalidAgentFrame(
                AgentErrorCode.INVALID_PATCH,
                f"a patch may change {' and '.join(PATCHABLE)}, not {name[:40]!r}",
            )
        if not isinstance(changes, dict):
            raise InvalidAgentFrame(
                AgentErrorCode.INVALID_PATCH, f"patch field {name!r} must be an object"
            )
        if codec.too_deep(changes, codec.MAX_DEPTH):
            raise InvalidAgentFrame(
                AgentErrorCode.INVALID_PATCH, f"patch nests deeper than {codec.MAX_DEPTH}"
            )
    return StatePatch(patch)


def _media(kind: str, msg: dict[str, Any]) -> Media:
    if kind == "clear":
        return Media("clear", "")
    field = "payload" if kind == "media" else "name"
    value = msg.get(field)
    if not isinstance(value, str) or not value:
        raise InvalidAgentFrame(
            AgentErrorCode.INVALID_MEDIA, f"a {kind} frame needs a string {field!r}"
        )
    if kind == "media":
        try:
            binascii.a2b_base64(value, strict_mode=True)
        except ValueError:  # binascii.Error, or a str that is not ASCII
            raise InvalidAgentFrame(
                AgentErrorCode.INVALID_MEDIA, "a media payload must be base64"
            ) from None
    elif len(value) > 256:
        raise InvalidAgentFrame(
            AgentErrorCode.INVALID_MEDIA, "a mark name is at most 256 characters"
        )
    return Media("media" if kind == "media" else "mark", value)


def caller_object(caller: CallerKey) -> dict[str, str]:
    """The caller as the agent sees it: the hello's fields, normalised."""
    field = "phone" if caller.kind == "phone" else "user_id"
    return {"tenant": caller.tenant, field: caller.subject, "call_id": caller.call_id}


def session_open(
    session: Session,
    caller: CallerKey,
    *,
    kind: Literal["session.start", "session.resume"],
    reason: str | None = None,
    stream: Mapping[str, Any] | None = None,
) -> bytes:
    """Return a ``session.start`` or ``session.resume`` frame with the state as it stands.

    Args:
        stream: The phone stream the client is, if it is one (``TwilioStream.stream``).
    """
    frame: dict[str, Any] = {
        "type": kind,
        "session_id": session.session_id,
        "caller": caller_object(caller),
        "state": session.state,
        "version": session.version,
    }
    if reason is not None:
        frame["reason"] = reason
    if stream is not None:
        frame["stream"] = stream
    return codec.dumps(frame)


def turn_frame(session: Session, turn: Turn) -> bytes:
    """Return the ``turn`` frame for a durable turn (``session.version`` is its version)."""
    frame: dict[str, Any] = {
        "type": "turn",
        "session_id": session.session_id,
        "turn_id": turn.turn_id,
        "version": session.version,
    }
    for name in ("text", "form", "context", "dtmf"):
        value = getattr(turn, name)
        if value is not None:
            frame[name] = value
    return codec.dumps(frame)


def session_end(session: Session) -> bytes:
    """Return the ``session.end`` frame sent after the client's bye."""
    return codec.dumps({"type": "session.end", "session_id": session.session_id})


def error_frame(exc: InvalidAgentFrame) -> bytes:
    """Return the ``error`` frame telling the agent which of its frames was rejected."""
    return codec.dumps({"type": "error", "code": exc.code, "message": exc.message})
