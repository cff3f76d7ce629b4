"""The per-connection token bucket."""

from __future__ import annotations

from gateway.core.ratelimit import TokenBucket


def test_burst_then_rate() -> None:
    """A full bucket allows a burst, then one event per 1/rate seconds."""
    bucket = TokenBucket(rate=2.0, burst=3.0)
    assert [bucket.take(10.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.wait() == 0.5
    assert not bucket.take(10.4)
    assert bucket.take(10.5)
    assert not bucket.take(10.5)


def test_refill_is_capped_at_the_burst() -> None:
    """A long pause refills the bucket to the burst, never beyond."""
    bucket = TokenBucket(rate=10.0, burst=2.0)
    assert bucket.take(0.0)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]
    assert bucket.wait() > 0
