"""One client WebSocket: what its protocol queued, who sends it, and the bounds on both.

A client that stops reading must cost a bounded amount of memory for a bounded time.
Two limits see to it (both in :class:`Outbound`):

* ``send_timeout``: no frame, ping or close waits longer than this to be taken by the
  client's TCP window; past it the connection is cut.
* ``max_send_queue``: frames other tasks queue for the connection (the agent's state
  changes and messages, a phone caller's audio) may wait up to this many bytes in all;
  past it the connection is cut at once and the queue dropped.

Cutting counts ``slow_consumer``, drops the queue, and gives the frame being written,
the error frame and close 4009 one more ``send_timeout`` in all before the TCP
connection is reset. The
session lingers as after any drop, and the client resumes with what it missed
replayed. The handler's own frames (a welcome and its replay) are bounded by the state
and replay limits instead, and by the time limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

from prometheus_client import Counter
from websockets.asyncio.connection import Connection as WebSocket
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.core.closecodes import ErrorCode
from gateway.core.wire import ClientProtocol
from gateway.transport.websocket import text_frames

__all__ = ["Connection", "Outbound", "can_send_now", "fits", "hang_up", "send_now"]

log = logging.getLogger("gateway.client")


@dataclass(frozen=True, slots=True, kw_only=True)
class Outbound:
    """How long a client may take to read, and how much may wait for it."""

    send_timeout: float = 20.0
    """Seconds a frame, ping or close may wait for the client to take it."""
    max_send_queue: int = 1 << 20
    """Bytes that other tasks may queue for one connection before it is cut."""


async def hang_up(ws: ServerConnection, code: int, reason: str, *, deadline: float) -> None:
    """Close ``ws`` with ``code``, resetting it if the close is not done by ``deadline``
    (event loop time).

    websockets' ``close()`` waits, unbounded, for the send buffer to drain before its
    own close timeout starts: a peer that stops reading would hold it forever.
    """
    try:
        async with asyncio.timeout_at(deadline):
            await ws.close(code, reason)
    except TimeoutError:
        ws.transport.abort()


_HEADER = 14
"""The most bytes a WebSocket frame's header takes (RFC 6455 section 5.2)."""


def fits(transport: asyncio.WriteTransport, size: int) -> bool:
    """Whether a frame of ``size`` bytes stays under ``transport``'s write limit: then
    websockets' send does not wait for the buffer to drain, and needs no deadline."""
    _, high = transport.get_write_buffer_limits()
    return transport.get_write_buffer_size() + size + _HEADER <= high


def can_send_now(ws: WebSocket, size: int) -> bool:
    """Whether websockets' ``send`` would write frames of ``size`` bytes (one header
    counted, as :func:`fits` does) without waiting:
    the connection open, no fragmented message being sent, and room under the transport's
    write limit. Then :func:`send_now` writes them with no coroutine, task or wake-up (the
    audio path's usual case)."""
    return (
        ws.protocol.state is State.OPEN and ws.send_in_progress is None and fits(ws.transport, size)
    )


def send_now(ws: WebSocket, frames: list[bytes]) -> None:
    """Write ``frames`` as text frames at once (check :func:`can_send_now` first): in one
    write, framed here when websockets would frame them the same (:func:`text_frames`)."""
    data = text_frames(ws.protocol, frames)
    try:
        if data is not None:
            ws.transport.write(data)
            return
        for frame in frames:
            ws.protocol.send_text(frame)
        ws.send_data()
    except (OSError, RuntimeError):
        ws.transport.abort()  # as websockets does; its reader sees the connection lost


@dataclass(slots=True, eq=False)
class Connection:
    """One client WebSocket: its protocol state and whoever is sending what it queued."""

    ws: ServerConnection
    protocol: ClientProtocol
    errors: Counter
    """``hangon_protocol_errors_total``: the error that closes the connection is counted here."""
    outbound: Outbound = Outbound()
    sent_seq: int = 0
    """The newest agent message queued on this connection."""
    sending: bool = False
    """A sender (the handler, or :attr:`writer`) is draining the queue; nobody else may."""
    writer: asyncio.Task[None] | None = None
    """A sender started by :meth:`flush`, until the queue is empty."""
    finished: bool = False
    """The handler has returned: nothing more is sent."""
    counted: bool = False
    """The error that closes this connection has been counted."""
    next_ping: float = 0.0
    """When :class:`~gateway.transport.keepalive.Keepalive` pings it next."""
    pinging: bool = False
    """The keepalive's ping is in flight."""
    tenant: str | None = None
    """The tenant whose connection count this connection holds (from its hello on)."""
    pending: int = 0
    """Bytes a sender took from the protocol and has not written yet."""
    drained: asyncio.Event | None = None
    """Made by :meth:`room` when it has to wait; set each time a frame was written, and
    once the handler returned. Most connections never need one."""
    cut_by: float | None = None
    """Set once the client was found not reading: the event loop time by which the error
    frame and close must have been taken, or the connection is reset."""

    def unexpected(self) -> None:
        """A bug met while serving this connection: log it and close the connection with
        ``internal_error``; the client resumes (call from an ``except`` block)."""
        log.exception("unexpected error on a client connection")
        self.protocol.fail(ErrorCode.INTERNAL_ERROR, "unexpected error; reconnect to resume")

    def flush(self) -> None:
        """Send what is queued, from a task of its own; for callers other than the handler.

        Past :attr:`Outbound.max_send_queue` bytes waiting, the connection is cut instead.
        """
        if self.finished:
            return
        waiting = self.protocol.buffered + self.ws.transport.get_write_buffer_size()
        if waiting > self.outbound.max_send_queue:
            self.cut(f"more than {self.outbound.max_send_queue} bytes waited to be read")
        self.send_soon()

    def send_soon(self) -> asyncio.Task[None] | None:
        """Send what is queued: at once if nothing has to wait (:meth:`write_now`), else from
        a writer task, unless a sender is on it already. Returns the writer it started.

        Unlike :meth:`flush`, no bound on the queue: for the handler's own frames, which
        the state and replay limits bound instead.
        """
        if self.sending or self.write_now():
            return None
        self.sending = True  # before the task runs: the handler must not send meanwhile
        writer = self.writer = asyncio.create_task(self._write())
        return writer

    def write_now(self) -> bool:
        """Write what is queued without a coroutine, task or wake-up, when nothing has to
        wait (see :func:`send_now`) and no close or error is pending; drop it when the
        client is gone. Returns whether that left nothing for a sender (:meth:`send`), as
        when nothing was queued."""
        protocol = self.protocol
        if self.cut_by is not None or protocol.close_reason is not None:
            return False
        if protocol.error_code is not None and not self.counted:
            return False
        if not protocol.queued:
            return True
        # fits() counts one frame's header; the others are counted here.
        size = protocol.buffered + _HEADER * (protocol.queued - 1)
        if not can_send_now(self.ws, size):
            if self.ws.protocol.state is not State.CLOSED:
                return False
            # The client is gone (a drop mid-turn): nothing queued can reach it, and a
            # sender would only find that out through websockets' ConnectionClosed. What
            # matters is replayed, or acked again, when it resumes.
            protocol.data_to_send()
        else:
            send_now(self.ws, protocol.data_to_send())
        if self.drained is not None:
            self.drained.set()
        return True

    def waiting(self) -> int:
        """Bytes queued for the client and not yet taken by its TCP connection."""
        return self.protocol.buffered + self.pending + self.ws.transport.get_write_buffer_size()

    async def room(self) -> None:
        """Wait until at most half of :attr:`Outbound.max_send_queue` waits for the client,
        so that a producer (the agent's relay) goes at the pace the client reads; cut the
        client if that takes longer than :attr:`Outbound.send_timeout`."""
        half = self.outbound.max_send_queue // 2
        if self.waiting() <= half:
            return  # the usual case: no timer armed
        try:
            async with asyncio.timeout(self.outbound.send_timeout):
                while self.waiting() > half and not self.finished and self.cut_by is None:
                    drained = self.drained = self.drained or asyncio.Event()
                    drained.clear()
                    await drained.wait()
        except TimeoutError:
            self.cut(f"{self.waiting()} bytes waited {self.outbound.send_timeout:g} s to be read")
            self.flush()

    def cut(self, why: str) -> None:
        """Give up on a client that does not read: drop its queue, close with 4009.

        What is already being written gets one more :attr:`Outbound.send_timeout`, and
        the error frame and close with it; then the TCP connection is reset.
        """
        protocol = self.protocol
        if self.cut_by is not None:
            return
        self.cut_by = asyncio.get_running_loop().time() + self.outbound.send_timeout
        log.warning("client not reading, cut: %s", why)
        protocol.data_to_send()  # what it did not read is replayed when it resumes
        if protocol.close_reason is not None:
            # Closing already (replaced, failed): only the wait is left to bound.
            self.errors.labels("slow_consumer").inc()
        protocol.fail(ErrorCode.SLOW_CONSUMER, f"the connection was cut: {why}; resume to catch up")

    async def send(self) -> None:
        """Send what is queued, in order, and close when the protocol says so.

        Each frame and the close may wait :attr:`Outbound.send_timeout` at most for the
        client to take it; past that, the connection is cut (:meth:`cut`).

        An error is counted once, as soon as a sender takes from the queue after it,
        before anything is sent: even when the client is already gone, and even
        without an error frame (a Twilio stream gets none).
        """
        self.sending = True
        try:
            # Counted before each take from the queue, so an error set while a send was
            # under way is counted before the close that follows it (no await between).
            self._count()
            while True:
                try:
                    await self._send_queued()
                    return
                except TimeoutError:
                    if self.cut_by is not None:
                        self.ws.transport.abort()  # not even the error and close were taken
                        return
                    self.cut(f"a frame waited {self.outbound.send_timeout:g} s to be read")
                    self._count()
        finally:
            self.sending = False
            self.pending = 0
            if self.drained is not None:
                self.drained.set()
            self._count()  # the client went away mid-send

    async def _send_queued(self) -> None:
        protocol, ws = self.protocol, self.ws
        while frames := protocol.data_to_send():
            self.pending = sum(len(frame) for frame in frames)
            transport = ws.transport
            for frame in frames:
                if fits(transport, len(frame)):
                    await ws.send(frame, text=True)  # the usual case: no timer armed
                else:
                    async with asyncio.timeout_at(self._deadline()):
                        await ws.send(frame, text=True)
                self.pending -= len(frame)
                if self.drained is not None:
                    self.drained.set()
            del frame  # an idle connection must not hold its last frame (a welcome)
            self._count()
        reason = protocol.close_reason
        if reason is not None and ws.state is State.OPEN:
            await hang_up(ws, reason.code, reason.reason, deadline=self._deadline())

    def _deadline(self) -> float:
        limit = asyncio.get_running_loop().time() + self.outbound.send_timeout
        return limit if self.cut_by is None else min(limit, self.cut_by)

    async def _write(self) -> None:
        try:
            with contextlib.suppress(ConnectionClosed):
                await self.send()
        finally:
            self.writer = None

    def _count(self) -> None:
        if self.protocol.error_code is not None and not self.counted:
            self.counted = True
            self.errors.labels(self.protocol.error_code).inc()
