"""Retry delays: exponential, capped, fully jittered."""

from __future__ import annotations

import itertools

from gateway.core.backoff import backoff


def test_bounds_double_up_to_cap() -> None:
    """With rand()=1 the delays are the bounds: doubling from the initial delay to the cap."""
    delays = list(backoff(initial_delay=0.1, max_delay=0.5, attempts=5, rand=lambda: 1.0))
    assert delays == [0.1, 0.2, 0.4, 0.5, 0.5]


def test_full_jitter_scales_bound() -> None:
    """Each delay is rand() times its bound, so retries spread out."""
    delays = list(backoff(initial_delay=1.0, max_delay=8.0, attempts=3, rand=lambda: 0.25))
    assert delays == [0.25, 0.5, 1.0]


def test_unbounded_without_attempts() -> None:
    """attempts=None yields forever."""
    assert len(list(itertools.islice(backoff(), 100))) == 100


def test_zero_attempts_yields_nothing() -> None:
    """attempts=0 means no retry at all."""
    assert list(backoff(attempts=0)) == []
