"""Retry delays: exponential growth with full jitter, as pure math.

Sleeping happens at the edge (:mod:`gateway.store.retry`); tests inject a
generator and need no real waiting.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator

__all__ = ["backoff"]


def backoff(
    *,
    initial_delay: float = 0.05,
    max_delay: float = 1.0,
    factor: float = 2.0,
    attempts: int | None = None,
    rand: Callable[[], float] = random.random,
) -> Iterator[float]:
    """Yield delays in seconds before each retry.

    The n-th delay is drawn uniformly from ``[0, min(max_delay, initial_delay * factor**n)]``
    ("full jitter"), so that many clients retrying at once spread out instead of
    hammering the store in lockstep.

    Args:
        initial_delay: Upper bound of the first delay, in seconds.
        max_delay: Cap on the upper bound, in seconds.
        factor: Growth of the upper bound per retry.
        attempts: Number of delays to yield; ``None`` yields forever.
        rand: Source of uniform numbers in ``[0, 1)``.
    """
    bound = initial_delay
    n = 0
    while attempts is None or n < attempts:
        yield rand() * bound
        bound = min(max_delay, bound * factor)
        n += 1
