"""Resume decisions: what a hello finds in the store.

The Redis store takes the same decisions inside ``scripts/restore.lua`` (one
round trip); the memory store calls :func:`classify`. The shared store tests
hold both to the same answers.

Resume tokens rotate: every ``welcome`` carries a new one (:class:`Tokens`). The
one it replaces stays valid until the new one is first used, so a client whose
``welcome`` was lost can still come back; after that it is retired, and a hello
that presents it is refused and recognised as a replay. The store keeps digests
(:func:`token_digest`), never the tokens.

A resume position is the last message sequence number the client received
(``last_seq`` in its hello); the session ID is the epoch of that position:
a new session starts again at 0, and ``welcome`` says ``resumed: false``.
:func:`plan_replay` decides what a resumed client is sent again.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
from dataclasses import dataclass

__all__ = ["Decision", "Outcome", "Replay", "Tokens", "classify", "plan_replay", "token_digest"]


class Outcome(enum.Enum):
    """What a restore found for a caller key."""

    HIT = "hit"
    """A live session: resumed."""
    MISS = "miss"
    """No session: a new one was created."""
    STALE = "stale"
    """A session older than the max age: replaced by a new one, flagged in ``welcome``."""
    REFUSED = "refused"
    """A live session, but the hello's resume token is wrong: nothing changed."""
    ENDED = "ended"
    """The session ended with ``bye``: not resumed, nothing changed."""


def token_digest(token: str) -> str:
    """What the store keeps of a resume token: its SHA-256, in hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _same(a: str, b: str) -> bool:
    return a != "" and hmac.compare_digest(a.encode(), b.encode())


@dataclass(frozen=True, slots=True)
class Tokens:
    """The digests of a session's resume tokens."""

    current: str
    """Of the token the last ``welcome`` carried."""
    previous: str = ""
    """Of the token it replaced: valid until :attr:`current` is first used (its welcome may
    have been lost). ``""``: none."""
    retired: str = ""
    """Of the token before that: no longer valid; presenting it is a replay."""
    spare: str = ""
    """Of a token issued but displaced before it was used: a resume that presented the
    previous token came after it (a lost welcome, or two resumes racing, such as a slow one
    landing after the client's next). Valid like :attr:`current` until one of them is used."""

    def accepts(self, presented: str) -> bool:
        """Whether a hello presenting the token with this digest may resume."""
        return (
            _same(presented, self.current)
            or _same(presented, self.previous)
            or _same(presented, self.spare)
        )

    def rotate(self, presented: str | None, new: str) -> Tokens:
        """The digests after a resume that presented ``presented`` and issued ``new``.

        Coming back with the previous token keeps it valid, and the current one too (as
        the spare): its welcome may have been lost, or may be in the hands of a client
        whose resume raced this one. Coming back with the current or spare token, or with
        none, retires the previous one. Retrying the same resume (its reply was lost) gives
        the same digests.
        """
        if presented is not None and _same(presented, self.previous):
            spare = self.spare if _same(new, self.current) else self.current
            return Tokens(new, self.previous, self.retired, spare)
        used = presented if presented is not None and _same(presented, self.spare) else None
        return Tokens(new, used or self.current, self.previous or self.retired)


@dataclass(frozen=True, slots=True)
class Decision:
    """What a hello gets, and whether the store puts a new session in place of the old."""

    outcome: Outcome
    replace: bool
    replayed: bool = False
    """Refused for presenting a retired resume token."""


def classify(
    *,
    exists: bool,
    ended: bool,
    updated_ms: int,
    tokens: Tokens,
    token: str | None,
    version: int,
    origin: Outcome,
    now_ms: int,
    max_age_ms: int | None,
) -> Decision:
    """Decide what a hello gets.

    A session nobody has written to yet (version 0) is not guarded by its token:
    a hello with another token gets the answer the session's creator got (miss
    or stale) and this session. That is the client whose welcome was lost after
    its old session had gone stale or expired, coming back with the only token
    it holds; refusing it would lock the call out for good.

    Args:
        exists: Whether a session is stored for the caller key.
        ended: Whether it ended with ``bye``.
        updated_ms: When it last changed (a turn, a resume, a renewal, a disconnect).
        tokens: Its resume token digests.
        token: The digest of the token the hello carried, if any (``None``: none, and
            none is required).
        version: Its version: how many turns were applied.
        origin: The outcome that created it (miss or stale).
        now_ms: The current time.
        max_age_ms: Sessions idle for longer are stale; ``None`` disables.
    """
    if not exists:
        return Decision(Outcome.MISS, replace=True)
    if ended:
        return Decision(Outcome.ENDED, replace=False)
    if max_age_ms is not None and now_ms - updated_ms > max_age_ms:
        return Decision(Outcome.STALE, replace=True)
    if token is not None and not tokens.accepts(token):
        if version == 0:
            return Decision(origin, replace=False)
        return Decision(Outcome.REFUSED, replace=False, replayed=_same(token, tokens.retired))
    return Decision(Outcome.HIT, replace=False)


@dataclass(frozen=True, slots=True)
class Replay:
    """What a resumed client is sent again: messages ``start`` to the newest.

    ``partial`` means the client missed messages that are no longer held (the
    replay window overran); ``welcome`` then says ``"replay": "partial"`` and
    ``replay_from: start``, and the client accepts the gap.
    """

    start: int
    partial: bool


def plan_replay(last_seq: int | None, *, seq: int, first: int) -> Replay:
    """Decide which messages a resuming client gets again.

    ``scripts/restore.lua`` reads the messages from the same position.

    Args:
        last_seq: The last sequence number the client received (``None``: none).
        seq: The newest sequence number of the session.
        first: The oldest sequence number still held (``seq + 1`` if none is).
    """
    want = (last_seq or 0) + 1
    if want > seq + 1:
        # The client saw messages the store no longer knows of (a store that lost
        # writes): say so, or it would discard the next ones as already seen.
        return Replay(seq + 1, partial=True)
    if want >= first:
        return Replay(want, partial=False)
    return Replay(first, partial=True)
