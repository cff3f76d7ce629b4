"""The interface every session store implements, and the storage layout.

Storage layout (Redis; the memory store keeps the same records in a dict)::

    {prefix}{tenant}:{digest}:session   hash  sid tok [prev] [dead] [spare] ver state created
                                              updated origin epoch seq push owner lease
                                              [wid] [ended]
    {prefix}{tenant}:{digest}:turns     zset  turn_id -> version it produced (last 64)
    {prefix}{tenant}:{digest}:msgs      list  the agent's messages (their data as JSON,
                                              sealed), oldest first, the newest being
                                              number ``seq``

``{digest}`` is literal braces around the digest: the Redis Cluster hash tag.
``origin`` is the outcome that created the session (``miss`` or ``stale``), so
that a retried restore whose first reply was lost answers the same. ``epoch``
grows by one on every restore; a write carrying another epoch is refused.
``push`` is the ID of the last agent write and ``wid`` that of the last turn
write, so that a retried one is recognised. ``owner`` is the ID of the instance
serving the session and ``lease`` the time (ms) until which its claim holds; it
renews the lease while it serves. A restore makes its instance the owner; if
another owner's lease was still running, that instance is told on the channel
``{prefix}owner:{instance}`` (message ``{sid} {epoch}``) to close its stale client
and agent connections.
``msgs`` holds at most the replay window and drops what the client acknowledged.

``digest`` is the caller key's keyed digest (:meth:`~gateway.core.sealing.Keyring.digest`):
no phone number or user ID appears in a key, and nobody without the caller hash key
can test a guessed number against one. ``state`` and each entry of ``msgs`` are sealed
with AES-256-GCM under a key ID (:mod:`gateway.core.sealing`), bound to the session
hash's key and the field (a message to its ``seq``). ``tok``, ``prev``, ``dead`` and
``spare`` are SHA-256 digests of the current, previous, retired and spare resume tokens
(:class:`~gateway.core.resume.Tokens`); the tokens themselves are never stored.
Every key of one session shares the hash tag, so each script touches one Redis
Cluster slot. Every key carries a TTL refreshed on each write.

Both stores check the arguments of every operation before they change anything
(:func:`check_restore`, :func:`check_turn`, :func:`check_push`, :func:`check_renewal`)
and refuse a bad one with a :class:`~gateway.exceptions.StoreError` that is not retried
(:func:`bad_argument`); each Redis script checks its own again (``scripts/check.lua``),
because Redis keeps the writes of a script that fails half way.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from gateway.core.callerkey import CallerKey
from gateway.core.resume import Outcome, Replay
from gateway.core.sealing import Keyring
from gateway.core.session import Push, Session, SessionId, TurnWrite
from gateway.exceptions import StoreConflict, StoreError

__all__ = [
    "MAX_INT",
    "MAX_MESSAGES",
    "MAX_OWNER",
    "MAX_SESSION_ID",
    "MAX_TURN_ID",
    "MAX_WRITE_ID",
    "Restored",
    "SessionStore",
    "StoreSettings",
    "Takeover",
    "Written",
    "bad_argument",
    "check_int",
    "check_push",
    "check_renewal",
    "check_restore",
    "check_turn",
    "conflict",
    "owner_channel",
    "session_keys",
]

MAX_INT = 2**53 - 1
"""The largest integer a store takes (times, durations, versions, epochs, sequence numbers):
Lua numbers are doubles, exact up to 2**53. The protocol's limit is the same."""
MAX_SESSION_ID = 128
"""Bytes of a session ID at most (the gateway's are 24)."""
MAX_TURN_ID = 512
"""Bytes of a turn ID at most: 128 characters of UTF-8 (the protocol's limit)."""
MAX_OWNER = 512
"""Bytes of an instance ID at most."""
MAX_WRITE_ID = 128
"""Bytes of a write's or a push's random ID at most (the gateway's are 12)."""
MAX_MESSAGES = 1024
"""Messages in one push at most (the gateway sends at most 64)."""

_REFUSALS = {
    "gone": "session expired or was replaced",
    "superseded": "a newer connection resumed this session",
    "ended": "session ended",
}


def conflict(op: str, status: str, stored_version: object = None) -> StoreConflict:
    """The error for a write the store refused, by the status its scripts return.

    ``status`` is ``gone``, ``superseded``, ``ended`` or ``conflict`` (with the
    ``stored_version`` found); both stores give the client the same words.
    """
    if status == "conflict":
        return StoreConflict(op, f"stored version is {stored_version}")
    return StoreConflict(op, _REFUSALS[status])


def bad_argument(op: str, name: str) -> StoreError:
    """The error for an operation refused for a bad argument: not retried, since a retry
    would carry the same argument."""
    return StoreError(op, f"bad argument {name}")


def check_int(op: str, name: str, value: int, low: int = 0) -> None:
    """Refuse ``value`` unless it is from ``low`` to :data:`MAX_INT`.

    Raises:
        StoreError: :func:`bad_argument`.
    """
    if not low <= value <= MAX_INT:
        raise bad_argument(op, name)


def _check_text(op: str, name: str, value: str, low: int, high: int) -> None:
    # Most values are short: measure the UTF-8 only when the characters might exceed it.
    size = len(value)
    if size < low or (size > high // 4 and len(value.encode()) > high):
        raise bad_argument(op, name)


def check_restore(candidate: Session, *, now_ms: int, last_seq: int | None, owner: str) -> None:
    """Refuse a restore with an argument out of range (see :func:`check_int`)."""
    check_int("restore", "now_ms", now_ms)
    if last_seq is not None:
        check_int("restore", "last_seq", last_seq)
    _check_text("restore", "session_id", candidate.session_id, 1, MAX_SESSION_ID)
    _check_text("restore", "owner", owner, 0, MAX_OWNER)


def check_turn(session_id: str, write: TurnWrite) -> None:
    """Refuse a turn write with an argument out of range (see :func:`check_int`)."""
    _check_text("write_turn", "session_id", session_id, 1, MAX_SESSION_ID)
    check_int("write_turn", "base_version", write.base_version)
    check_int("write_turn", "version", write.version)
    _check_text("write_turn", "turn_id", write.turn_id, 1, MAX_TURN_ID)
    check_int("write_turn", "now_ms", write.at_ms)
    check_int("write_turn", "epoch", write.epoch)
    _check_text("write_turn", "write_id", write.write_id, 1, MAX_WRITE_ID)


def check_push(session_id: str, push: Push) -> None:
    """Refuse a push with an argument out of range (see :func:`check_int`)."""
    _check_text("push", "session_id", session_id, 1, MAX_SESSION_ID)
    check_int("push", "epoch", push.epoch)
    check_int("push", "base_version", push.base_version)
    check_int("push", "version", push.version)
    check_int("push", "base_seq", push.base_seq)
    if len(push.messages) > MAX_MESSAGES:
        raise bad_argument("push", "count")
    check_int("push", "base_seq", push.seq)
    check_int("push", "acked_seq", push.acked_seq)
    check_int("push", "now_ms", push.at_ms)
    _check_text("push", "push_id", push.push_id, 1, MAX_WRITE_ID)


def check_renewal(
    op: str, session_id: str, *, now_ms: int, epoch: int, owner: str | None = None
) -> None:
    """Refuse an ``end`` or a ``touch`` (``op``) with an argument out of range."""
    _check_text(op, "session_id", session_id, 1, MAX_SESSION_ID)
    check_int(op, "now_ms", now_ms)
    check_int(op, "epoch", epoch)
    if owner is not None:
        _check_text(op, "owner", owner, 0, MAX_OWNER)


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreSettings:
    """What every store needs to know about keys and lifetimes."""

    key_prefix: str = "hangon:"
    """Prefix of every key."""
    ttl: float = 3600.0
    """Seconds a live session's keys outlive its last write."""
    end_ttl: float = 300.0
    """Seconds a session's keys live after ``bye``."""
    max_age: float | None = 900.0
    """Seconds of inactivity after which a session is stale; ``None`` disables."""
    replay_window: int = 128
    """Messages kept per session for a client that missed them."""
    lease: float = 60.0
    """Seconds an instance's ownership of a session lasts unless renewed."""
    keyring: Keyring = field(default_factory=Keyring.generate)
    """Seals state and messages and digests caller keys; every instance sharing a store
    needs the same one. Random by default: what it seals dies with the process."""


Takeover = Callable[[SessionId, int], None]
"""Called with a session ID and the epoch at which another instance took it over."""


def owner_channel(prefix: str, owner: str) -> str:
    """Return the pub/sub channel on which instance ``owner`` hears of takeovers."""
    return f"{prefix}owner:{owner}"


@functools.lru_cache(maxsize=65536)
def session_keys(prefix: str, caller: CallerKey, keyring: Keyring) -> tuple[str, str, str]:
    """Return the (session hash, turns zset, messages list) keys of ``caller``.

    The first also scopes what is sealed for the session (:func:`~gateway.core.sealing.aad`).
    Cached: every write of a session needs them, and the digest is a keyed hash.
    """
    base = f"{prefix}{caller.tenant}:{{{keyring.digest(caller)}}}"
    return f"{base}:session", f"{base}:turns", f"{base}:msgs"


@dataclass(frozen=True, slots=True)
class Restored:
    """What a restore found: the outcome and, unless refused or ended, the session.

    ``messages`` are those the client missed, from ``replay.start`` on.
    ``displaced`` is the instance that owned the session with a running lease
    until this restore took it over; it is to be told.
    """

    outcome: Outcome
    session: Session | None
    replay: Replay = Replay(1, partial=False)
    messages: tuple[bytes, ...] = ()
    displaced: str | None = None
    replayed: bool = False
    """Refused for presenting a retired resume token (see :class:`~gateway.core.resume.Tokens`)."""


class Written(NamedTuple):
    """What a turn write did."""

    version: int
    """The version the turn produced."""
    applied: bool
    """Whether the stored state is this write's: written now, or by an earlier try of this
    very write whose reply was lost. ``False`` for a turn ID applied by another write."""


class SessionStore(Protocol):
    """Durable session snapshots keyed by caller.

    Implementations raise :class:`~gateway.exceptions.StoreUnavailable` or
    :class:`~gateway.exceptions.StoreTimeout` for transient failures (the caller
    retries), :class:`~gateway.exceptions.StoreConflict` when the stored
    session is no longer the one being written, and a plain
    :class:`~gateway.exceptions.StoreError` (not retried) for an argument out of range
    (:func:`bad_argument`), having changed nothing.
    """

    name: str
    """``memory`` or ``redis``; a metrics label."""
    settings: StoreSettings
    """Key prefix, lifetimes and the keyring."""

    async def restore(
        self,
        caller: CallerKey,
        *,
        token: str | None,
        candidate: Session,
        now_ms: int,
        last_seq: int | None = None,
        owner: str = "",
    ) -> Restored:
        """Find the session of ``caller`` and load it, in one step.

        The session's owner becomes ``owner``, with a fresh lease.

        A live session whose current or previous token matches (or ``token`` is
        ``None``) is a hit: its ``updated`` time is refreshed, its epoch bumped, its
        tokens rotated so that ``candidate.resume_token`` is the current one, and the
        messages after ``last_seq`` still held are returned; a missing or stale one is replaced by
        ``candidate`` (whose replay is planned from ``last_seq`` like any other: a client that
        had seen messages is told it is partial); a refused or ended one is left untouched. Finding
        ``candidate`` itself (a retry after a lost reply) answers as the attempt
        that stored it did. A session with no turn yet (version 0) is not guarded
        by its token: a hello with another token gets it, with the outcome that
        created it (see :func:`gateway.core.resume.classify`). The session returned
        always carries ``candidate.resume_token``: the token for the next resume.
        """
        ...

    def write_turn(
        self, caller: CallerKey, session_id: SessionId, write: TurnWrite
    ) -> Awaitable[Written]:
        """Write the snapshot after a turn and record its turn ID, in one step.

        An awaitable, not necessarily a coroutine: the Redis store returns a future, which
        the handler waits for with a callback (:func:`asyncio.ensure_future` makes one of
        either).

        Returns:
            ``write.version`` and ``applied=True`` if the stored state is now this
            write's (including an earlier try of it whose reply was lost); else,
            for a turn ID another write applied, its version and ``applied=False``.

        Raises:
            StoreConflict: If the stored session is not ``session_id`` at
                ``write.epoch`` and ``write.base_version``.
        """
        ...

    async def push(self, caller: CallerKey, session_id: SessionId, push: Push) -> None:
        """Write the agent's state patch and messages, in one step.

        The messages list then holds at most ``replay_window`` messages and none
        up to ``push.acked_seq``. A retry of a push that landed succeeds.

        Raises:
            StoreConflict: If the stored session is not ``session_id`` at
                ``push.epoch``, ``push.base_version`` and ``push.base_seq``.
        """
        ...

    async def end(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int
    ) -> None:
        """Mark the session ended; its keys then live for ``end_ttl``.

        A session already ended or gone is left alone.

        Raises:
            StoreConflict: If a newer hello superseded ``epoch``.
        """
        ...

    async def touch(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int, owner: str
    ) -> None:
        """Restart the session's age and TTL and renew ``owner``'s lease.

        An ``owner`` of ``""`` releases the session: the next restore elsewhere
        displaces nobody. A session ended or gone is left alone.

        Raises:
            StoreConflict: If a newer hello superseded ``epoch``.
        """
        ...

    async def notify(self, owner: str, session_id: SessionId, epoch: int) -> None:
        """Tell instance ``owner`` that another took ``session_id`` over at ``epoch``."""
        ...

    async def listen(self, owner: str, on_takeover: Takeover) -> None:
        """Call ``on_takeover`` for each notification to ``owner``, until cancelled.

        Notifications are best effort (Redis pub/sub): one sent while the
        subscription is down is lost, and the epoch check is what fences.
        """
        ...

    async def ping(self) -> None:
        """Return if the store answers; raise a store error otherwise."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
