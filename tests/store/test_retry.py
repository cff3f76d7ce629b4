"""Retrying store operations, with injected sleep and clock: no real waiting."""

from __future__ import annotations

import pytest

from gateway.exceptions import StoreConflict, StoreError, StoreTimeout, StoreUnavailable
from gateway.store.retry import retry


class Flaky:
    """Fails with the given errors in turn, then returns "ok"."""

    def __init__(self, *errors: StoreError) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, delay: float) -> None:
        self.slept.append(delay)
        self.now += delay


async def test_transient_errors_are_retried() -> None:
    """Unavailable and timeout errors are retried after each delay until the op succeeds."""
    op = Flaky(StoreUnavailable("restore", "down"), StoreTimeout("restore", "slow"))
    t = FakeTime()
    seen: list[StoreError] = []
    assert await retry(op, [0.1, 0.2, 0.4], on_error=seen.append, sleep=t.sleep) == "ok"
    assert op.calls == 3
    assert t.slept == [0.1, 0.2]
    assert [type(e) for e in seen] == [StoreUnavailable, StoreTimeout]


async def test_conflict_is_not_retried() -> None:
    """A conflict is final: raised at once, no sleep."""
    op = Flaky(StoreConflict("write_turn", "moved"))
    t = FakeTime()
    with pytest.raises(StoreConflict):
        await retry(op, [0.1], sleep=t.sleep)
    assert (op.calls, t.slept) == (1, [])


async def test_last_error_raised_when_delays_run_out() -> None:
    """After the last delay, the last transient error is raised."""
    op = Flaky(*(StoreUnavailable("end", str(i)) for i in range(5)))
    t = FakeTime()
    with pytest.raises(StoreUnavailable, match="end: 2"):
        await retry(op, [0.1, 0.1], sleep=t.sleep)
    assert op.calls == 3


async def test_budget_stops_retries() -> None:
    """No retry starts once it would begin past the budget."""
    op = Flaky(*(StoreUnavailable("touch", str(i)) for i in range(10)))
    t = FakeTime()
    with pytest.raises(StoreUnavailable):
        await retry(op, [1.0] * 10, budget=2.5, sleep=t.sleep, clock=t.clock)
    assert t.slept == [1.0, 1.0]
    assert op.calls == 3
