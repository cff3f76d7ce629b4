"""A clock the test sets, for gateways and stores that take one."""

from __future__ import annotations

import time

__all__ = ["Clock"]


class Clock:
    """A settable clock in milliseconds, starting now."""

    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)
