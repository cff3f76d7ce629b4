"""IDs that need only be unique, not unpredictable: write and push IDs.

The store compares them to recognise a retry whose first try landed; nobody guesses them.
A random prefix per process and a counter make them without randomness per call (a
``secrets.token_urlsafe`` each took four times as long). A forked child takes a prefix
of its own, or it would hand out its parent's IDs again.
"""

from __future__ import annotations

import itertools
import os
import secrets

__all__ = ["unique_id"]

_prefix = secrets.token_urlsafe(9)
_count = itertools.count()


def unique_id() -> str:
    """An ID that no other call, here or in another process, returns: a random prefix
    per process (72 bits) and a counter."""
    return f"{_prefix}{next(_count):x}"


def _reseed() -> None:
    """In a forked child: a prefix of its own, the count from zero."""
    global _prefix, _count
    _prefix = secrets.token_urlsafe(9)
    _count = itertools.count()


os.register_at_fork(after_in_child=_reseed)
