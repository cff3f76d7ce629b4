"""Resume decisions: what a hello finds in the store.

The Redis store takes the same decisions inside ``scripts/restore.lua`` (one
round trip); the memory store calls :func:`classify`. The shared store tests
hold both to the same answers.
"""

from __future__ import annotations

import enum
import hmac

__all__ = ["Outcome", "classify"]


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


def classify(
    *,
    exists: bool,
    ended: bool,
    updated_ms: int,
    stored_token: str,
    token: str | None,
    now_ms: int,
    max_age_ms: int | None,
) -> Outcome:
    """Decide what a hello gets.

    Args:
        exists: Whether a session is stored for the caller key.
        ended: Whether it ended with ``bye``.
        updated_ms: When it last changed (a turn, a resume or a disconnect).
        stored_token: Its resume token.
        token: The token the hello carried, if any (``None``: authentication off).
        now_ms: The current time.
        max_age_ms: Sessions idle for longer are stale; ``None`` disables.
    """
    if not exists:
        return Outcome.MISS
    if ended:
        return Outcome.ENDED
    if max_age_ms is not None and now_ms - updated_ms > max_age_ms:
        return Outcome.STALE
    if token is not None and not hmac.compare_digest(token.encode(), stored_token.encode()):
        return Outcome.REFUSED
    return Outcome.HIT
