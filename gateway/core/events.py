"""What :class:`gateway.core.protocol.Protocol` produces from client frames."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gateway.core.callerkey import CallerKey

__all__ = ["Ack", "Bye", "Event", "Forward", "Hello", "Turn"]


@dataclass(frozen=True, slots=True)
class Hello:
    """The client opened (or reopened) a session for ``caller``."""

    caller: CallerKey
    resume_token: str | None
    last_seq: int | None
    """The last message sequence number the client received; ``None``: none."""
    token: str | None = None
    """A signed client token (:mod:`gateway.core.auth`), if the hello carried one."""


@dataclass(frozen=True, slots=True)
class Turn:
    """One conversational turn; ``form`` and ``context`` are shallow-merged into state."""

    turn_id: str
    text: str | None
    form: dict[str, Any] | None
    context: dict[str, Any] | None
    dtmf: str | None = None
    """A key the caller pressed on the phone (Twilio Media Streams)."""


@dataclass(frozen=True, slots=True)
class Ack:
    """The client received every message up to ``seq``."""

    seq: int


@dataclass(frozen=True, slots=True)
class Bye:
    """The client ended the session."""


@dataclass(frozen=True, slots=True)
class Forward:
    """A frame for the voice agent that is relayed, never stored (the caller's audio)."""

    frame: bytes


Event = Hello | Turn | Ack | Bye
