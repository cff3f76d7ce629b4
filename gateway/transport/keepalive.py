"""WebSocket keepalive for every client connection, from one task.

websockets' own keepalive runs a task per connection that sleeps between pings:
ten thousand idle callers held ten thousand sleeping tasks, about 2 KiB each. Here
one sweep runs every :data:`TICK` seconds over the open connections and pings
those whose turn has come; a ping waits for its pong in a task of its own, for a
round trip. What a client sees is what websockets does: a ping every
``interval`` seconds, and close 1011 ``keepalive ping timeout`` when no pong
comes within ``timeout`` of the ping being queued (websockets' own keepalive starts
that clock only once the send buffer drained, which a peer that stops reading never
lets happen). If the close frame is not taken within ``timeout`` either, the TCP
connection is reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Callable, Iterable
from typing import Protocol

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import CloseCode
from websockets.protocol import State

from gateway.transport.connection import hang_up

__all__ = ["TICK", "Keepalive", "Pinged"]

log = logging.getLogger("gateway.keepalive")

TICK = 1.0
"""Seconds between sweeps at most; a shorter interval sweeps more often."""


class Pinged(Protocol):
    """A connection the keepalive looks after."""

    ws: ServerConnection
    next_ping: float
    """Event loop time of its next ping; 0 until the keepalive first sees it."""
    pinging: bool
    """A ping is in flight: sent, or waiting to be sent behind a client that stopped
    reading. No second one starts meanwhile, as in websockets' own keepalive."""


class Keepalive:
    """Pings every connection ``connections()`` yields, every ``interval`` seconds.

    Args:
        connections: The open connections, read at every sweep.
        interval: Seconds between a connection's pings.
        timeout: Seconds a pong may take before the connection is closed with 1011;
            ``None``: never.
    """

    def __init__(
        self,
        connections: Callable[[], Iterable[Pinged]],
        *,
        interval: float,
        timeout: float | None,
    ) -> None:
        self.connections = connections
        self.interval = interval
        self.timeout = timeout
        self.tick = min(TICK, interval / 4)
        self._pings: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        """Sweep until cancelled; cancelling also stops the pings waiting for pongs."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self.tick)
                self.sweep(loop.time())
        finally:
            for task in self._pings:
                task.cancel()

    def sweep(self, now: float) -> None:
        """Ping the connections whose turn has come."""
        for conn in self.connections():
            if conn.next_ping == 0:
                # First seen: its first ping one interval from now, jittered by a tick so
                # that connections opened in one storm do not all ping in one sweep.
                conn.next_ping = now + self.interval + random.random() * self.tick
            elif conn.next_ping <= now and not conn.pinging and conn.ws.state is State.OPEN:
                conn.next_ping = now + self.interval
                conn.pinging = True
                task = asyncio.create_task(self._ping(conn))
                self._pings.add(task)
                task.add_done_callback(self._pinged)

    def _pinged(self, task: asyncio.Task[None]) -> None:
        self._pings.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("keepalive ping failed", exc_info=exc)

    async def _ping(self, conn: Pinged) -> None:
        ws = conn.ws
        try:
            with contextlib.suppress(ConnectionClosed):
                if self.timeout is None:
                    await ws.ping()  # the pong frees the waiter; nothing waits for it
                    return
                try:
                    # The clock starts when the ping is queued: websockets' ping() returns
                    # only once the send buffer drained, which a peer that stopped reading
                    # never lets happen.
                    async with asyncio.timeout(self.timeout):
                        pong = await ws.ping()
                        await pong
                except TimeoutError:
                    deadline = asyncio.get_running_loop().time() + self.timeout
                    await hang_up(
                        ws, CloseCode.INTERNAL_ERROR, "keepalive ping timeout", deadline=deadline
                    )
        finally:
            conn.pinging = False
