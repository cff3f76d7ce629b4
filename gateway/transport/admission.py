"""Admission control: how many hellos restore at once, how many wait, and when to say "later".

A reconnect storm brings thousands of hellos in the same second. Each costs a
store round trip and a welcome; run all at once, they slow each other down
until clients time out and come back again. :class:`Admission` lets
``max_restores`` run at once and queues the rest in arrival order. Once
``restore_queue`` hellos wait, new ones are refused at once, with a hint of
when to come back (:meth:`Admission.retry_after`), as Centrifugo's connection
rate limit and Discord's identify buckets do: refusing early is cheap, and a
client told when to return does not return with everyone else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import time
from collections.abc import AsyncIterator, Callable

from gateway.config import LimitsConfig

__all__ = ["Admission"]

_MIN_RETRY = 0.5
_MAX_RETRY = 30.0
_SMOOTHING = 0.2
"""Weight of the newest restore in the running mean of restore times."""
_RATE_WINDOW = 256
"""Restores whose completion times give the current restore rate."""
_RATE_SAMPLES = 32
"""Finishes needed before their spacing is trusted as the rate: the first few restores of a
storm trickle out while the process is busy accepting it, and a rate read from them would
tell every client shed then to wait the 30 s cap."""
_RATE_GAP = 1.0
"""Seconds without a restore finishing after which the rate is measured afresh: the restores
of an earlier burst (the connects of minutes ago) say nothing of this one's pace."""


class Admission:
    """A bound on concurrent restores, with a bounded queue in front of it.

    Args:
        max_restores: Hellos restoring at once.
        restore_queue: Hellos waiting for their turn beyond which new ones are refused.
        clock: Seconds, for timing restores.
    """

    def __init__(
        self,
        max_restores: int,
        restore_queue: int,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.max_restores = max_restores
        self.restore_queue = restore_queue
        self._slots = asyncio.Semaphore(max_restores)
        self._clock = clock
        self._rng = rng or random.Random()
        self.waiting = 0
        """Hellos queued for a restore slot."""
        self.restoring = 0
        """Hellos restoring now."""
        self.mean_seconds = 0.005
        """Running mean of a restore's duration, once any has run."""
        self._finished: collections.deque[float] = collections.deque(maxlen=_RATE_WINDOW)
        """When the latest restores finished: their spacing is the rate the queue drains at."""

    @classmethod
    def from_limits(cls, limits: LimitsConfig) -> Admission:
        """Admission as ``--max-restores`` and ``--restore-queue`` configure it."""
        return cls(limits.max_restores, limits.restore_queue)

    def full(self) -> bool:
        """Whether a new hello must be refused: the queue is at its limit."""
        return self.waiting >= self.restore_queue

    def rate(self) -> float:
        """Restores finished per second lately; before there are enough, what the slots
        would give at the mean restore time (a short hint: a client shed again costs a
        refused handshake, one told to wait too long waits for nothing)."""
        if len(self._finished) >= _RATE_SAMPLES:
            span = self._finished[-1] - self._finished[0]
            if span > 0:
                return (len(self._finished) - 1) / span
        return self.max_restores / self.mean_seconds

    def retry_after(self) -> float:
        """Seconds a refused client should wait: about as long as the queue takes to drain,
        spread over twice that so the refused do not all come back together.

        The drain time comes from the rate restores actually finish at, not from the
        slots and the mean restore time: when the CPU, not the slots, is what limits a
        storm, a restore takes longer without more of them finishing each second.
        """
        drain = (self.waiting + self.restoring) / self.rate()
        # Spread after the floor, or every hint in a short queue would be the floor itself.
        base = min(_MAX_RETRY, max(_MIN_RETRY, drain))
        return round(min(_MAX_RETRY, base * (1.0 + self._rng.random())), 2)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        """Wait for a restore slot (in arrival order), and hold it for the body."""
        self.waiting += 1
        try:
            await self._slots.acquire()
        finally:
            self.waiting -= 1
        self.restoring += 1
        started = self._clock()
        try:
            yield
        finally:
            self.restoring -= 1
            self._slots.release()
            now = self._clock()
            self.mean_seconds += _SMOOTHING * (now - started - self.mean_seconds)
            if self._finished and now - self._finished[-1] > _RATE_GAP:
                # Kept, the last burst's finishes would spread this one's rate over the
                # idle time between them, and every hint of a new storm would be the cap.
                self._finished.clear()
            self._finished.append(now)
