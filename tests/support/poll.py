"""Waiting, in real time, for something a test cannot be told of."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

__all__ = ["until"]


async def until(condition: Callable[[], object], timeout: float = 5) -> None:
    """Return once ``condition()`` is true, checking every 5 ms.

    Raises:
        TimeoutError: When it is still false after ``timeout`` seconds.
    """
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.005)
