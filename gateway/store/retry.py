"""Retrying store operations on transient errors, with backoff; the sleeping edge of
:mod:`gateway.core.backoff`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from gateway.exceptions import StoreError

__all__ = ["Tries", "retry"]

T = TypeVar("T")


class Tries:
    """What one store operation has left to retry with: delays and a time budget.

    Every store operation is safe to repeat: a restore that created a session
    finds it on the next try, and a turn already written is recognised by its
    turn ID.

    Args:
        delays: Seconds to wait before each retry; when exhausted, the last error
            is final.
        budget: Seconds after the first try past which no retry starts; ``None``
            leaves only ``delays`` as the bound. A try under way is not cut short:
            the client waits at most about this plus one try.
        on_error: Called with every error, retried or not (for metrics).
        clock: Monotonic seconds, injected in tests.
        spent: Seconds since the first try began, for tries made after it (a turn's
            write makes its first try before it needs a :class:`Tries`).
    """

    __slots__ = ("_clock", "_deadline", "_on_error", "_pending")

    def __init__(
        self,
        delays: Iterable[float],
        *,
        budget: float | None = None,
        on_error: Callable[[StoreError], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        spent: float = 0.0,
    ) -> None:
        self._pending = iter(delays)
        self._deadline = None if budget is None else clock() + budget - spent
        self._on_error = on_error
        self._clock = clock

    def after(self, exc: StoreError) -> float | None:
        """Count the failed try's ``exc``; the seconds to wait before the next try, or
        ``None`` when ``exc`` is final."""
        if self._on_error is not None:
            self._on_error(exc)
        delay = next(self._pending, None) if exc.retryable else None
        if delay is None or (self._deadline is not None and self._clock() + delay > self._deadline):
            return None
        return delay

    async def run(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> T:
        """Run ``op``, retrying after each delay while it fails with a retryable store error.

        Args:
            op: Starts one try.
            sleep: Injected in tests.

        Raises:
            StoreError: The first non-retryable error, or the last retryable one.
        """
        while True:
            try:
                return await op()
            except StoreError as exc:
                delay = self.after(exc)
                if delay is None:
                    raise
            await sleep(delay)


async def retry(
    op: Callable[[], Awaitable[T]],
    delays: Iterable[float],
    *,
    budget: float | None = None,
    on_error: Callable[[StoreError], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``op``, retrying after each delay while it fails with a retryable store error
    (see :class:`Tries` for the arguments).

    Raises:
        StoreError: The first non-retryable error, or the last retryable one.
    """
    tries = Tries(delays, budget=budget, on_error=on_error, clock=clock)
    return await tries.run(op, sleep=sleep)
