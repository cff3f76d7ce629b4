"""Retrying store operations on transient errors, with backoff; the sleeping edge of
:mod:`gateway.core.backoff`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

from gateway.exceptions import StoreError

__all__ = ["retry"]

T = TypeVar("T")


async def retry(
    op: Callable[[], Awaitable[T]],
    delays: Iterable[float],
    *,
    budget: float | None = None,
    on_error: Callable[[StoreError], None] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> T:
    """Run ``op``, retrying after each delay while it fails with a retryable store error.

    Every store operation is safe to repeat: a restore that created a session
    finds it on the next try, and a turn already written is recognised by its
    turn ID.

    Args:
        op: Starts one attempt.
        delays: Seconds to wait before each retry; when exhausted, the last error
            is raised.
        budget: Seconds after the first try past which no retry starts; ``None``
            leaves only ``delays`` as the bound. A try under way is not cut short:
            the client waits at most about this plus one try.
        on_error: Called with every error, retried or not (for metrics).
        sleep: Injected in tests.
        clock: Monotonic seconds, injected in tests.

    Raises:
        StoreError: The first non-retryable error, or the last retryable one.
    """
    pending = iter(delays)
    deadline = None if budget is None else clock() + budget
    while True:
        try:
            return await op()
        except StoreError as exc:
            if on_error is not None:
                on_error(exc)
            delay = next(pending, None) if exc.retryable else None
            if delay is None or (deadline is not None and clock() + delay > deadline):
                raise
        await sleep(delay)
