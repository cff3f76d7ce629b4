"""One WebSocket to the voice agent per live session, redialled with backoff.

:class:`AgentLink` opens the connection, sends ``session.start`` or
``session.resume`` first (built when the connection opens, so it carries the
state as it stands then), then whatever the session forwards (turns,
``session.end``, a phone caller's audio). Each frame the agent sends goes to
``take``, which parses it once (:meth:`gateway.transport.relay.Relay.take`):
what it returns waits in ``inbox`` for the session to persist and relay.

While the link is down, forwarded frames are dropped rather than queued: the
``session.resume`` sent on the next connection carries the state they produced.
A caller's audio is the exception: the newest :data:`EARLY_MEDIA` frames are
kept and sent after the opening frame, so that words spoken while the link
dials are not lost (nor seconds-old audio replayed after a long outage).
The client is told nothing about the agent's connection.

The agent is a peer like any other, and untrusted: each frame sent to it may wait
``send_timeout`` seconds to be read, and ``max_queue`` bytes in all may wait for it
(audio is dropped first); past either, the connection is dropped and redialled, and
``session.resume`` tells the agent where the session stands. What it sends waits in
an :class:`Inbox` of at most ``max_queue`` bytes; when that is full the link stops
reading, which holds the agent back. A link that fails unexpectedly logs it once with
its session, releases its connection and gauge, and stops; the session goes on without
an agent until its next resume dials a new link.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from typing import Generic, TypeVar

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI
from websockets.protocol import Event, State

from gateway.metrics import Metrics
from gateway.transport.connection import can_send_now, fits, send_now
from gateway.transport.websocket import taken_now

__all__ = [
    "EARLY_MEDIA",
    "MAX_QUEUED_MEDIA",
    "AgentLink",
    "AgentSocket",
    "Inbox",
    "Opening",
    "Take",
    "TakeNow",
]

log = logging.getLogger("gateway.downstream")

_CLOSE_TIMEOUT = 5.0
"""Seconds to send ``session.end`` and close a link before it is dropped."""
_STABLE = 5.0
"""Seconds a connection must have lasted for the redial delays to start small again."""
MAX_QUEUED_MEDIA = 1500
"""Droppable frames (a caller's audio) queued for a slow agent at most: 30 s of 20 ms chunks."""
EARLY_MEDIA = 100
"""Droppable frames kept while the link is down, the newest: 2 s of 20 ms chunks."""

Opening = Callable[[str], bytes]
"""Builds a connection's first frame (``session.start`` or ``session.resume``) for a reason."""
T = TypeVar("T")


class Inbox(Generic[T]):
    """The agent's parsed frames waiting to be persisted, bounded in the characters (or
    bytes) they arrived as, not in frames.

    A frame is taken whatever its size when the inbox is empty (the agent's frame limit
    bounds it), so that one large frame cannot wedge the link.
    """

    def __init__(self, *, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        """Characters (or bytes) of the frames held."""
        self.holding = 0
        """Producers waiting for room: the agent is being held back, on purpose."""
        self._frames: deque[tuple[T, int]] = deque()
        self._readable = asyncio.Event()
        self._room = asyncio.Event()

    def empty(self) -> bool:
        return not self._frames

    async def put(self, frame: T, size: int) -> None:
        """Add ``frame``, received as ``size`` characters, waiting while the inbox is full."""
        while self._frames and self.size + size > self.max_size:
            self._room.clear()
            self.holding += 1
            try:
                await self._room.wait()
            finally:
                self.holding -= 1
        self._frames.append((frame, size))
        self.size += size
        self._readable.set()

    async def get(self) -> tuple[T, int]:
        """Take the oldest frame and its size, waiting for one."""
        while not self._frames:
            self._readable.clear()
            await self._readable.wait()
        return self.get_nowait()

    def get_nowait(self) -> tuple[T, int]:
        """Take the oldest frame and its size; :class:`IndexError` if there is none."""
        frame = self._frames.popleft()
        self.size -= frame[1]
        self._room.set()
        return frame


Take = Callable[["AgentLink[T]", str | bytes], "T | None"]
"""Parses an agent frame from a link: what is to wait in the inbox, or ``None`` if the
frame was dealt with (refused, or a phone caller's audio sent on)."""

TakeNow = Callable[["AgentLink[T]", str], bool]
"""Deals with an agent's text frame as it is read, if it can be at once (a phone caller's
audio); ``False`` leaves it, untouched, to :data:`Take`."""


class AgentSocket(ClientConnection):
    """The agent link's WebSocket: a frame that :attr:`take_now` deals with at once (a
    phone caller's audio) is taken as it is parsed (:func:`taken_now`), rather than queued
    for the link's reader task."""

    take_now: Callable[[str], bool] | None = None

    def process_event(self, event: Event) -> None:
        if not taken_now(self, event, self.take_now):
            super().process_event(event)


class AgentLink(Generic[T]):
    """The connection of one session to the voice agent.

    Args:
        url: The agent's ``ws://`` or ``wss://`` URL.
        opening: Builds the first frame for a reason: ``start`` (a new session),
            ``client_resumed`` or ``agent_reconnected``.
        reason: The reason for the first connection.
        inbox: Where the agent's frames wait, as ``take`` returns them.
        metrics: Counts connections and their failures.
        delays: A fresh, endless sequence of redial delays (seconds) per outage.
        max_size: Largest frame accepted from the agent; larger ones drop the link.
        open_timeout: Seconds to wait for the agent's handshake.
        send_timeout: Seconds a frame may wait for the agent to read it.
        max_queue: Bytes that may wait to be sent to the agent.
        session_id: For log lines.
        take: Parses every agent frame, once.
        take_now: Deals with a frame as it is read, when it can be (:class:`AgentSocket`).
    """

    def __init__(
        self,
        url: str,
        *,
        opening: Opening,
        reason: str,
        inbox: Inbox[T],
        take: Take[T],
        metrics: Metrics,
        delays: Callable[[], Iterator[float]],
        max_size: int,
        open_timeout: float,
        session_id: str,
        send_timeout: float = 20.0,
        max_queue: int = 1 << 20,
        take_now: TakeNow[T] | None = None,
    ) -> None:
        self.url = url
        self._opening = opening
        self._reason = reason
        self._inbox = inbox
        self._metrics = metrics
        self._delays = delays
        self._max_size = max_size
        self._open_timeout = open_timeout
        self._send_timeout = send_timeout
        self._max_queue = max_queue
        self._queued = 0
        """Bytes in :attr:`_outbox`."""
        self._session_id = session_id
        self._take = take
        self._take_now = take_now
        self._ws: ClientConnection | None = None
        self._outbox: deque[bytes] = deque()
        self._early: deque[bytes] = deque()
        self._early_size = 0
        """Bytes in :attr:`_early`."""
        self._wake = asyncio.Event()
        self._closing = False
        self._final: bytes | None = None
        self._task = asyncio.create_task(self._run())

    def send(self, frame: bytes, *, droppable: bool = False) -> None:
        """Forward ``frame`` if the agent is connected; drop it otherwise (see module doc).

        A ``droppable`` frame (audio) is kept while the link is down (the newest
        :data:`EARLY_MEDIA`), and dropped while :data:`MAX_QUEUED_MEDIA` frames
        wait for an agent that reads slower than the caller speaks; it is counted
        as relayed or dropped where its fate is decided.
        """
        ws = self._ws
        if not droppable:
            if ws is not None and not self._closing:
                if self._queued + len(frame) > self._max_queue:
                    # Not reading: what is queued goes, and so does the connection. The
                    # redial's session.resume says where the session stands.
                    self._metrics.agent_cuts.labels("slow_consumer").inc()
                    log.warning(
                        "agent not reading, link dropped session=%s queued=%d",
                        self._session_id,
                        self._queued,
                    )
                    self._clear()
                    ws.transport.abort()
                    return
                self._queue(frame)
            return
        media = self._metrics.media_frames
        if self._closing:
            media["to_agent", "dropped"].inc()
        elif ws is None:
            # The newest EARLY_MEDIA frames, and no more than half the queue in bytes.
            while self._early and (
                len(self._early) >= EARLY_MEDIA
                or self._early_size + len(frame) > self._max_queue // 2
            ):
                self._early_size -= len(self._early.popleft())
                media["to_agent", "dropped"].inc()
            self._early.append(frame)
            self._early_size += len(frame)
        elif (
            len(self._outbox) >= MAX_QUEUED_MEDIA
            or self._queued + len(frame) > self._max_queue // 2
        ):
            # Audio may take half the queue: the rest stays for turns, which matter more.
            media["to_agent", "dropped"].inc()
        else:
            self._queue(frame)
            media["to_agent", "relayed"].inc()

    def _queue(self, frame: bytes) -> None:
        ws = self._ws
        if (
            ws is not None
            and not self._outbox
            and not self._closing
            and can_send_now(ws, len(frame))
        ):
            send_now(ws, [frame])  # nothing ahead of it and room: no wake-up of the loop
            return
        self._outbox.append(frame)
        self._queued += len(frame)
        self._wake.set()

    def _clear(self) -> None:
        self._outbox.clear()
        self._queued = 0

    def reopen(self, reason: str) -> None:
        """Tell the agent where the session stands, now or on the next connection.

        Before the first connection, ``start`` stays the reason: the agent has not
        heard of the session yet.
        """
        if self._ws is not None:
            self.send(self._opening(reason))
        elif self._reason != "start":
            self._reason = reason

    def stop(self, final: bytes | None = None) -> Awaitable[None]:
        """Stop at once: send ``final`` (``session.end``) if connected, then close.

        Nothing else is sent from this call on. Returns what to await for the link
        to be closed (at most :data:`_CLOSE_TIMEOUT` seconds for a stuck agent).
        """
        self._closing = True
        self._final = final
        self._wake.set()
        if self._early:
            self._metrics.media_frames["to_agent", "dropped"].inc(len(self._early))
            self._early.clear()
            self._early_size = 0
        if self._ws is None:
            self._task.cancel()
        return self._wait()

    async def _wait(self) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _run(self) -> None:
        try:
            await self._dial()
        except Exception:
            # A bug, or input that got past the checks: logged once, here, with the session;
            # the connection and gauge were released on the way out. Redialling would only
            # fail again.
            log.exception("agent link failed session=%s", self._session_id)
            self._metrics.agent_cuts.labels("error").inc()
            self._closing = True
            self._clear()
            self._early.clear()
            self._early_size = 0

    async def _dial(self) -> None:
        delays = self._delays()
        while not self._closing:
            try:
                ws = await connect(
                    self.url,
                    open_timeout=self._open_timeout,
                    max_size=2 * self._max_size,
                    compression=None,
                    create_connection=AgentSocket,
                )
            except (OSError, TimeoutError, InvalidHandshake, InvalidURI) as exc:
                self._metrics.agent_connects.labels("error").inc()
                delay = next(delays)
                log.warning(
                    "agent unreachable session=%s error=%s retry_in=%.2fs",
                    self._session_id,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            self._metrics.agent_connects.labels("ok").inc()
            opened = time.monotonic()
            await self._serve(ws)
            self._reason = "agent_reconnected"
            if time.monotonic() - opened > _STABLE:
                delays = self._delays()
            if not self._closing:
                # An agent that accepts and hangs up at once must not be redialled in a loop.
                await asyncio.sleep(next(delays))

    async def _serve(self, ws: ClientConnection) -> None:
        self._metrics.agent_links_active.inc()
        reader: asyncio.Task[None] | None = None
        try:
            self._clear()
            if not self._closing:
                # Built now, so it carries the state as it stands; never once stopped, when
                # the session it would describe may be another one.
                self._queue(self._opening(self._reason))
                for frame in self._early:
                    self._queue(frame)
                self._metrics.media_frames["to_agent", "relayed"].inc(len(self._early))
            self._early.clear()
            self._early_size = 0
            self._ws = ws
            if self._take_now is not None and isinstance(ws, AgentSocket):
                ws.take_now = functools.partial(self._take_now, self)
            reader = asyncio.create_task(self._read(ws))
            # The reader's end wakes the loop too: one Event to wait on, rather than a
            # task and a wait() per frame relayed (the audio path's hottest line).
            reader.add_done_callback(lambda _: self._wake.set())
            while not reader.done():
                while self._outbox:
                    frame = self._outbox.popleft()
                    self._queued -= len(frame)
                    if fits(ws.transport, len(frame)):
                        await ws.send(frame, text=True)  # the usual case: no timer armed
                    else:
                        await self._send_slowly(ws, frame)
                    del frame
                if self._closing:
                    # An agent that stops reading must not hold up a shutdown.
                    async with asyncio.timeout(_CLOSE_TIMEOUT):
                        if self._final is not None:
                            await ws.send(self._final, text=True)
                        await ws.close(1000, "session closed")
                    break
                self._wake.clear()
                await self._wake.wait()
        except ConnectionClosed:
            pass
        except TimeoutError:
            if not self._closing:
                self._metrics.agent_cuts.labels("slow_consumer").inc()
                log.warning("agent not reading, link dropped session=%s", self._session_id)
            ws.transport.abort()
        finally:
            if isinstance(ws, AgentSocket):
                ws.take_now = None  # it holds this link: no cycle left behind
            self._ws = None
            self._clear()
            self._metrics.agent_links_active.dec()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                    await reader
            if ws.state is not State.CLOSED:
                ws.transport.abort()  # left by an unexpected error: never held open
            if not self._closing:
                log.warning("agent link dropped session=%s", self._session_id)

    async def _send_slowly(self, ws: ClientConnection, frame: bytes) -> None:
        """Send a frame that waits for the send buffer to drain, for ``send_timeout`` at
        most, not counting the time the inbox holds the agent back: an agent that blocks
        on its own sends while we do not read it cannot read us either, and is not to
        blame (the client that is not reading is, and is cut by its own bounds).

        Raises:
            TimeoutError: The agent did not read the frame in time.
        """
        sending = asyncio.ensure_future(ws.send(frame, text=True))
        try:
            while True:
                done, _ = await asyncio.wait({sending}, timeout=self._send_timeout)
                if done:
                    sending.result()
                    return
                if not self._inbox.holding:
                    raise TimeoutError
        finally:
            if not sending.done():
                sending.cancel()

    async def _read(self, ws: ClientConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                try:
                    taken = self._take(self, frame)
                except Exception:
                    # The link must outlive a bad frame or a bug in its parsing.
                    log.exception("agent frame not taken session=%s", self._session_id)
                    taken = None
                if taken is not None:
                    await self._inbox.put(taken, len(frame))
