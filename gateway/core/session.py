"""Session state and how a turn changes it, as pure functions.

The state a client sees in ``welcome`` is::

    {"context": {...}, "form_answers": {...}, "last_turn": null | {...}}

A turn shallow-merges ``form`` into ``form_answers`` and ``context`` into
``context``, records itself as ``last_turn`` and bumps ``version`` by one. The
gateway applies a turn to a copy, writes the copy, and only adopts it once the
write succeeded (see :meth:`Session.commit`).

The voice agent changes state too: its ``state`` patches merge into
``form_answers`` and ``context`` (a ``null`` value deletes a key, as in JSON
Merge Patch, RFC 7396, one level down). Its messages get consecutive sequence
numbers (``seq``) per session. Patches and messages that arrive together are
written as one :class:`Push`.

``epoch`` counts restores: every hello that resumes a session bumps it in the
store, and a write carrying an older epoch is refused, so a connection (or a
lingering agent link) that another hello superseded cannot write.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, NewType

from gateway.core import codec
from gateway.core.events import Turn
from gateway.core.ids import unique_id

__all__ = [
    "PATCHABLE",
    "Push",
    "ResumeToken",
    "Session",
    "SessionId",
    "TurnWrite",
    "empty_state",
    "merge_patch",
    "new_resume_token",
    "new_session_id",
]

SessionId = NewType("SessionId", str)
ResumeToken = NewType("ResumeToken", str)

RECENT_TURNS = 64
"""How many applied turn IDs a session remembers to recognise a re-sent turn."""

PATCHABLE = ("form_answers", "context")
"""The state fields a voice agent's ``state`` patch may change."""


def new_session_id() -> SessionId:
    """Return a fresh random session ID (128 bits)."""
    return SessionId("s_" + secrets.token_urlsafe(16))


def new_resume_token() -> ResumeToken:
    """Return a fresh random resume token (192 bits)."""
    return ResumeToken(secrets.token_urlsafe(24))


def empty_state() -> dict[str, Any]:
    """Return the state of a session that has seen no turn."""
    return {"context": {}, "form_answers": {}, "last_turn": None}


@dataclass(frozen=True, slots=True)
class TurnWrite:
    """A turn applied to a copy of the state, ready to be written."""

    turn_id: str
    base_version: int
    version: int
    state: dict[str, Any]
    at_ms: int
    encoded: bytes
    """``state`` as JSON, encoded once for the size check and the store."""
    epoch: int
    """The epoch the session was restored at; the store refuses the write under another."""
    write_id: str
    """Unique (:func:`unique_id`); stored with the write, so that a retry whose first
    try landed is recognised (the stored state cannot tell: it is sealed afresh, with a
    new nonce, on every try)."""


@dataclass(frozen=True, slots=True)
class Push:
    """What the voice agent sent, ready to be written in one step.

    ``messages`` get the sequence numbers ``base_seq + 1`` onwards. ``state`` is
    ``None`` when no patch came with them; otherwise ``version`` is
    ``base_version + 1``.
    """

    epoch: int
    base_version: int
    version: int
    state: dict[str, Any] | None
    encoded: bytes | None
    base_seq: int
    messages: tuple[bytes, ...]
    """Each message's ``data``, as JSON."""
    acked_seq: int
    """The highest sequence number the client acknowledged: older messages may go."""
    at_ms: int
    push_id: str
    """Unique (:func:`unique_id`); stored with the push, so a retry whose first try
    landed is recognised."""

    @property
    def seq(self) -> int:
        """The sequence number of the last message after this push."""
        return self.base_seq + len(self.messages)


@dataclass(slots=True)
class Session:
    """A session as this gateway holds it while a client is connected.

    Attributes mirror the stored snapshot; ``recent_turns`` maps the last
    :data:`RECENT_TURNS` applied turn IDs to the version each produced, oldest first.
    """

    session_id: SessionId
    resume_token: ResumeToken
    version: int
    state: dict[str, Any]
    created_ms: int
    updated_ms: int
    recent_turns: dict[str, int] = field(default_factory=dict)
    seq: int = 0
    """Sequence number of the last agent message stored for this session."""
    last_push: str = ""
    """The ``push_id`` of the last :class:`Push` written."""
    epoch: int = 1
    """1 for a new session, plus one per restore (see the module docstring)."""

    def applied_version(self, turn_id: str) -> int | None:
        """Return the version ``turn_id`` produced if it was already applied, else ``None``."""
        return self.recent_turns.get(turn_id)

    def apply(self, turn: Turn, now_ms: int) -> TurnWrite:
        """Apply ``turn`` to a copy of the state without changing this session."""
        state = dict(self.state)
        if turn.form:
            state["form_answers"] = {**state.get("form_answers", {}), **turn.form}
        if turn.context:
            state["context"] = {**state.get("context", {}), **turn.context}
        last: dict[str, Any] = {"turn_id": turn.turn_id, "at_ms": now_ms}
        if turn.text is not None:
            last["text"] = turn.text
        if turn.form:
            last["form"] = turn.form
        if turn.dtmf is not None:
            last["dtmf"] = turn.dtmf
        state["last_turn"] = last
        return TurnWrite(
            turn.turn_id,
            self.version,
            self.version + 1,
            state,
            now_ms,
            codec.dumps(state),
            self.epoch,
            unique_id(),
        )

    def push(
        self,
        patches: list[dict[str, Any]],
        messages: list[bytes],
        *,
        acked_seq: int,
        now_ms: int,
    ) -> Push:
        """Apply the agent's ``patches`` to a copy of the state and number its ``messages``.

        Patches must have been checked with :func:`gateway.core.agent.parse_frame`.
        """
        state: dict[str, Any] | None = None
        if patches:
            state = self.state
            for patch in patches:
                state = merge_patch(state, patch)
        return Push(
            epoch=self.epoch,
            base_version=self.version,
            version=self.version + (state is not None),
            state=state,
            encoded=None if state is None else codec.dumps(state),
            base_seq=self.seq,
            messages=tuple(messages),
            acked_seq=min(acked_seq, self.seq),
            at_ms=now_ms,
            push_id=unique_id(),
        )

    def commit_push(self, push: Push) -> None:
        """Adopt ``push`` once it is durable."""
        if push.state is not None:
            self.state = push.state
            self.version = push.version
        self.seq = push.seq
        self.last_push = push.push_id
        self.updated_ms = push.at_ms

    def commit(self, write: TurnWrite) -> None:
        """Adopt ``write`` once it is durable."""
        self.state = write.state
        self.version = write.version
        self.updated_ms = write.at_ms
        remember(self.recent_turns, write.turn_id, write.version)


def merge_patch(state: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``state`` with one checked patch merged in (``null`` deletes a key)."""
    state = dict(state)
    for name, changes in patch.items():
        merged = dict(state.get(name) or {})
        for key, value in changes.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = value
        state[name] = merged
    return state


def remember(recent: dict[str, int], turn_id: str, version: int) -> None:
    """Record ``turn_id`` in ``recent``, dropping the oldest beyond :data:`RECENT_TURNS`."""
    recent[turn_id] = version
    while len(recent) > RECENT_TURNS:
        del recent[next(iter(recent))]
