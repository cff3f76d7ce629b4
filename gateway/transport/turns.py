"""One client connection's turns: checked, written to the store and answered, in order.

:class:`Turns` belongs to a :class:`~gateway.transport.client_ws.Handler` from the hello
on. A turn usually goes out with no await (:meth:`Turns.soon`): the session's lock is
taken without waiting, the lifecycle plans the write, the store starts it, and the
handler goes back to reading; the store's reply is answered from a callback
(:meth:`Turns._turn_done`), so that a turn wakes one task, the reader, as a message to a
bare echo server does; one read while the handler waits with nothing queued is checked
and started from ``data_received`` (:meth:`Turns.now`), waking none. The handler acts on
no frame before the turn is answered (:meth:`Turns.settled`). A degraded session, or a
lock someone holds, takes the awaiting road (:meth:`Turns.write`); a first try that
failed is retried from a task of its own (:attr:`Turns.writing`) with the same delays
and budget as every store operation.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Awaitable
from typing import Any

from gateway.core import agent
from gateway.core.closecodes import ErrorCode
from gateway.core.events import Turn
from gateway.core.lifecycle import Duplicate, Refusal, Write
from gateway.core.ratelimit import TokenBucket
from gateway.core.session import Session, TurnWrite
from gateway.exceptions import StoreConflict, StoreError
from gateway.store.base import Written
from gateway.store.retry import Tries
from gateway.transport.connection import Connection
from gateway.transport.sessions import LiveSession, Sessions

__all__ = ["Turns"]

log = logging.getLogger("gateway.client")


class Turns:
    """The turns of one connection to one live session."""

    __slots__ = ("answered", "bucket", "conn", "live", "sender", "sessions", "writing")

    def __init__(self, sessions: Sessions, conn: Connection, live: LiveSession) -> None:
        self.sessions = sessions
        self.conn = conn
        self.live = live
        self.bucket: TokenBucket | None = None
        """The connection's turn allowance, from its first turn on."""
        self.writing: asyncio.Future[Any] | None = None
        """The turn being written while the handler reads on (:meth:`soon`): its first
        try, or the task retrying it."""
        self.answered: asyncio.Future[None] | None = None
        """Set once :attr:`writing` is over, for the handler waiting on it (:meth:`settled`)."""
        self.sender: asyncio.Task[None] | None = None
        """The writer that the last turn's answer had to start: the next frame waits for it."""

    @property
    def busy(self) -> bool:
        """A turn is being written, or its answer waits for the client: the next frame
        waits (:meth:`settled`)."""
        return self.writing is not None or self.sender is not None

    def stop(self) -> None:
        """The handler was cancelled: the write in flight stops with it, as in :meth:`write`."""
        if self.writing is not None:
            self.writing.cancel()

    def may(self, turn: Turn, now: float) -> bool:
        """Whether ``turn`` may go on to be written: not past the connection's turn rate
        (else the connection fails), not after a turn still unstored (else it is nacked)."""
        live, conn = self.live, self.conn
        if self.sessions.limits.max_turns_per_second is not None and not self._allowed(now):
            assert self.bucket is not None
            conn.protocol.fail(
                ErrorCode.RATE_LIMITED,
                f"more than {self.sessions.limits.max_turns_per_second:g} turns per second;"
                " resume after retry_after",
                retry_after=round(max(1.0, self.bucket.wait()), 1),
            )
            return False
        held = live.life.held_back(conn, turn)
        if held is not None:
            self._nack(turn, held.why)
            return False
        return True

    def _allowed(self, now: float) -> bool:
        """Whether the connection may send this turn under ``--max-turns-per-second``."""
        limits = self.sessions.limits
        bucket = self.bucket
        if bucket is None:
            assert limits.max_turns_per_second is not None
            bucket = self.bucket = TokenBucket(
                limits.max_turns_per_second, float(limits.turn_burst)
            )
        return bucket.take(now)

    def soon(self, turn: Turn) -> bool:
        """Start writing ``turn`` and go back to reading, if nothing makes it wait: the
        session neither degraded nor locked. Its reply is handled by :meth:`_turn_done`,
        a callback, so that a turn wakes no task but the reader's; the handler acts on
        no frame before the turn is answered. ``False``: await :meth:`write` instead."""
        if not self._locked_now():
            return False
        self._start(turn)
        return True

    def now(self, turn: Turn, now: float) -> bool:
        """Check ``turn`` and start writing it as it is read, from ``data_received`` (see
        :func:`~gateway.transport.websocket.taken_now`), if nothing makes it wait: no
        turn before it still unanswered, and :meth:`soon`'s conditions. ``False``: leave
        it to the handler, untouched."""
        live = self.live
        if self.busy or not self._locked_now():
            return False
        try:
            allowed = self.may(turn, now)
        except BaseException:
            live.lock.release()
            raise
        if allowed:
            self._start(turn)
        else:
            live.lock.release()  # refused or nacked: answered already
        return True

    def _locked_now(self) -> bool:
        """Take the session's lock without waiting, unless the session is degraded or the
        lock is held or waited for (then a turn takes the awaiting road, :meth:`write`)."""
        live = self.live
        return live.recovered is None and live.lock.try_acquire()

    def _start(self, turn: Turn) -> None:
        """Plan ``turn`` and start its write (the session locked: released when it is over)."""
        live = self.live
        try:
            write = self._planned(turn)
            if write is None:
                live.lock.release()
                return
            session = live.session
            assert session is not None
            started = time.perf_counter()
            pending = asyncio.ensure_future(self._store(session, write))
        except BaseException:
            live.lock.release()
            raise
        self.writing = pending
        pending.add_done_callback(functools.partial(self._turn_done, turn, session, write, started))

    def _turn_done(
        self,
        turn: Turn,
        session: Session,
        write: TurnWrite,
        started: float,
        pending: asyncio.Future[Written],
    ) -> None:
        """The first try of ``turn``'s write is over: answer the turn, or leave its
        retries to a task (:meth:`_turn_again`)."""
        if pending.cancelled():  # with the handler (run): the turn goes unanswered
            self._turn_over(started)
            return
        try:
            try:
                written = pending.result()
            except StoreError as exc:
                spent = time.perf_counter() - started
                tries = self.sessions.tries(spent=spent)
                delay = tries.after(exc)
                if delay is not None:
                    self.writing = asyncio.create_task(
                        self._turn_again(turn, session, write, started, tries, delay)
                    )
                    return
                self._not_written(turn, session, write, exc)
            else:
                self._written(turn, session, write, written)
        except BaseException:  # a callback's failure would only be logged, the lock kept
            self.conn.unexpected()
        self._turn_over(started)

    async def _turn_again(
        self,
        turn: Turn,
        session: Session,
        write: TurnWrite,
        started: float,
        tries: Tries,
        delay: float,
    ) -> None:
        """Retry ``turn``'s write after its first try failed, as :meth:`write` would."""
        try:
            await asyncio.sleep(delay)
            written = await tries.run(lambda: self._store(session, write))
        except StoreError as exc:
            self._not_written(turn, session, write, exc)
        except Exception:
            self.conn.unexpected()
        else:
            self._written(turn, session, write, written)
        finally:
            self._turn_over(started)

    def _store(self, session: Session, write: TurnWrite) -> Awaitable[Written]:
        """One try of ``write`` in the store (each road to it: :meth:`soon`, its retries,
        :meth:`write`)."""
        return self.sessions.store.write_turn(self.live.caller, session.session_id, write)

    def _turn_over(self, started: float) -> None:
        """A turn's write is done: time it, let go of the session, send the answer."""
        self.sessions.metrics.store_op_seconds["write_turn"].observe(time.perf_counter() - started)
        self.live.lock.release()
        self.writing = None
        # As when the handler sent its answers itself, the next frame waits until a client
        # slow to read has taken this one (see settled).
        self.sender = self.conn.send_soon()
        answered, self.answered = self.answered, None
        if answered is not None and not answered.done():
            answered.set_result(None)

    async def settled(self) -> None:
        """Wait until the turn being written is answered (or failed), and the answer sent
        if it had to wait for the client."""
        while self.writing is not None:
            # A future of its own, not the write: a cancelled reader must not cancel the
            # write's answer (and asyncio.wait costs more, on every drop mid-turn).
            answered = self.answered = asyncio.get_running_loop().create_future()
            await answered
        sender, self.sender = self.sender, None
        if sender is not None:
            await sender

    async def write(self, turn: Turn) -> None:
        """Write ``turn`` as the session's lifecycle plans it, and answer it (when
        :meth:`soon` cannot)."""
        live = self.live
        if live.recovered is not None and not await live.restored():
            self._nack(turn, "session store unreachable; send the turn again")
            return
        async with live.lock:
            write = self._planned(turn)
            if write is None:
                return
            sessions, session = self.sessions, live.session
            assert session is not None
            try:
                written = await sessions.call(
                    "write_turn",
                    lambda: self._store(session, write),
                )
            except StoreError as exc:
                self._not_written(turn, session, write, exc)
                return
            self._written(turn, session, write, written)

    def _planned(self, turn: Turn) -> TurnWrite | None:
        """Plan ``turn`` (the session locked): the write the store must take, or ``None``
        when it was answered already."""
        live, sessions, conn = self.live, self.sessions, self.conn
        plan = live.life.plan_turn(
            conn, turn, now_ms=sessions.clock(), max_state_size=sessions.limits.max_state_size
        )
        if isinstance(plan, Write):
            return plan.write
        if isinstance(plan, Duplicate):
            sessions.metrics.turns_duplicate.inc()
            self._ack(turn, plan.version)
        elif isinstance(plan, Refusal):
            conn.protocol.fail(plan.code, plan.message)
        # Ignore: replaced meanwhile; this connection was told and is closing.
        return None

    def _written(self, turn: Turn, session: Session, write: TurnWrite, written: Written) -> None:
        live, sessions = self.live, self.sessions
        if live.life.turn_written(write, applied=written.applied):
            sessions.metrics.turns_applied.inc()
            if live.link is not None:
                live.link.send(agent.turn_frame(session, turn))
        else:
            # Another connection applied this turn ID first.
            sessions.metrics.turns_duplicate.inc()
        self._ack(turn, written.version)

    def _not_written(self, turn: Turn, session: Session, write: TurnWrite, exc: StoreError) -> None:
        protocol = self.conn.protocol
        if isinstance(exc, StoreConflict):
            log.info("turn refused session=%s reason=%s", session.session_id, exc.detail)
            protocol.fail(ErrorCode.SESSION_CONFLICT, f"{exc.detail}; reconnect to resume")
        elif exc.retryable:
            log.warning("turn not written session=%s error=%s", session.session_id, exc)
            self.live.life.turn_unsure(write)
            self._nack(turn, "turn not saved: session store unavailable; send it again")
        else:
            log.warning("turn not written session=%s error=%s", session.session_id, exc)
            protocol.fail(
                ErrorCode.STORE_UNAVAILABLE, "turn not saved: store unavailable; reconnect, resend"
            )

    def _ack(self, turn: Turn, version: int) -> None:
        self.conn.protocol.send_ack(turn.turn_id, version)
        self.live.life.acked(turn)

    def _nack(self, turn: Turn, why: str) -> None:
        """Tell the client its turn was not stored and to send it again, staying connected.

        Until that turn is acked, the connection's later turns are nacked too: each must
        land after the ones sent before it.
        """
        self.live.life.nacked(self.conn, turn)
        self.sessions.metrics.turns.labels("nacked").inc()
        # Spread: every session of an outage must not come back at the same instant.
        wait = round(random.uniform(1.0, 3.0), 1)
        self.conn.protocol.send_nack(
            turn.turn_id, ErrorCode.STORE_UNAVAILABLE, why, retry_after=wait
        )
