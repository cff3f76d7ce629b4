"""Deadlines of one length for many connections, kept by one timer.

Every connection gets a few seconds to finish its upgrade, and then a few to send its
hello. An ``asyncio.timeout`` per connection for each costs a timer armed and
cancelled, and a ``Timeout`` entered and left, at every connect: in a reconnect storm,
tens of thousands of timers that almost never fire. Since all of one kind have the
same length, they expire in the order they were set: :class:`Deadlines` keeps them in a
queue behind a single timer, which wakes at most ``1 / GRAIN`` times a second.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["GRAIN", "Deadline", "Deadlines"]

T = TypeVar("T")

log = logging.getLogger("gateway")

GRAIN = 0.1
"""Seconds by which a deadline may be late: the expiries due within it go together."""


class Deadline(Generic[T]):
    """One item's place in :class:`Deadlines`; :meth:`cancel` when it is met."""

    __slots__ = ("item", "when")

    def __init__(self, when: float, item: T) -> None:
        self.when = when
        self.item: T | None = item

    def cancel(self) -> None:
        """The item met its deadline: nothing happens to it, and it is let go at once."""
        self.item = None


class Deadlines(Generic[T]):
    """Call ``expire(item)`` ``timeout`` seconds after each :meth:`add` unless cancelled.

    Args:
        timeout: Seconds from :meth:`add` to ``expire``; the same for every item.
        expire: Called with each item whose deadline passed, from the event loop. It
            must check that the item still needs it (a connection may be gone).
    """

    def __init__(self, timeout: float, expire: Callable[[T], None]) -> None:
        self.timeout = timeout
        self._expire = expire
        self._queue: collections.deque[Deadline[T]] = collections.deque()
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, item: T) -> Deadline[T]:
        """Start ``item``'s deadline, now; call from the event loop."""
        loop = asyncio.get_running_loop()
        deadline = Deadline(loop.time() + self.timeout, item)
        queue = self._queue
        # Most deadlines are met within milliseconds: let the met ones at the front go
        # now rather than at their time, so the queue holds about as many as are pending.
        while queue and queue[0].item is None:
            queue.popleft()
        queue.append(deadline)
        if self._timer is None:
            self._timer = loop.call_at(queue[0].when + GRAIN, self._fire)
        return deadline

    def close(self) -> None:
        """Stop the timer and forget every deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._queue.clear()

    def _fire(self) -> None:
        self._timer = None
        loop = asyncio.get_running_loop()
        now, queue = loop.time(), self._queue
        while queue and queue[0].when <= now:
            deadline = queue.popleft()
            item = deadline.item
            if item is not None:
                deadline.item = None
                try:
                    self._expire(item)
                except Exception:
                    log.exception("deadline handling failed")
        if queue and self._timer is None:
            self._timer = loop.call_at(queue[0].when + GRAIN, self._fire)
