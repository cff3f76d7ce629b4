"""Serve one client WebSocket: hello, turns, acks and bye, in order.

A client connection's :class:`Handler` reads and acts on frames strictly in order
(a turn is written and answered before the next frame is acted on) and then sends
what the protocol queued. A turn's write usually goes out with no await: the handler
reads on, and the store's reply is answered from a callback
(:meth:`Handler._turn_soon`), so that a turn wakes one task, the reader, as a message
to a bare echo server does. What other tasks queue (the agent's messages, a
takeover's error) is sent by a writer task that lives only until the queue is
empty (:class:`~gateway.transport.connection.Connection`). Nothing ever waits on a
client's socket while holding the session lock, so a half-open connection cannot
hold up the client that replaces it. An idle connection has one task, its handler,
as in a bare websockets server.

The protocol (v1 JSON or a Twilio Media Stream) turns frames into events; the
hello goes through :class:`~gateway.transport.opening.Opening`; every turn is
planned by the session's :class:`~gateway.core.lifecycle.Lifecycle` and written
here; the live sessions themselves are :mod:`gateway.transport.sessions`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import time
import urllib.parse
from collections.abc import Awaitable
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

from gateway.core import agent
from gateway.core.auth import AuthError, Grant
from gateway.core.closecodes import BYE, SERVICE_RESTART, ErrorCode
from gateway.core.events import Ack, Bye, Forward, Hello, Turn
from gateway.core.lifecycle import TOKEN_REQUIRED, Duplicate, Refusal, Write
from gateway.core.protocol import Protocol
from gateway.core.ratelimit import TokenBucket
from gateway.core.session import Session, TurnWrite
from gateway.core.twilio import TwilioStream
from gateway.core.wire import ClientProtocol
from gateway.exceptions import StoreConflict, StoreError
from gateway.store.base import Written
from gateway.store.retry import Tries
from gateway.transport.connection import Connection
from gateway.transport.opening import Opening
from gateway.transport.sessions import LiveSession, Sessions, now_ms
from gateway.transport.websocket import ClientSocket, forget_upgrade

__all__ = ["TOKEN_SUBPROTOCOL", "Handler", "handle_client", "now_ms", "upgrade_token"]

log = logging.getLogger("gateway.client")

TOKEN_SUBPROTOCOL = "hangon.token."
"""Prefix of the subprotocol that carries a browser's token: ``new WebSocket(url,
["hangon.v1", "hangon.token." + token])``; the gateway answers ``hangon.v1``."""


def handle_client(
    sessions: Sessions, ws: ServerConnection, *, twilio: bool = False
) -> Awaitable[None]:
    """Serve one client connection until it closes (what to await).

    Not a coroutine itself: an idle connection waits in one frame, its handler's.

    Args:
        twilio: The client is a Twilio Media Stream (:mod:`gateway.core.twilio`),
            not a protocol v1 client.
    """
    limits, default_region = sessions.limits, sessions.config.caller.default_region
    protocol: ClientProtocol
    if twilio:
        protocol = TwilioStream(
            max_message_size=limits.max_message_size,
            caller_param=sessions.config.twilio.twilio_caller_param,
            default_region=default_region,
        )
    else:
        protocol = Protocol(max_message_size=limits.max_message_size, default_region=default_region)
    conn = Connection(ws, protocol, sessions.metrics.protocol_errors, sessions.outbound)
    return Handler(sessions, conn).run()


class Handler:
    """One client connection's frames, acted on in order."""

    __slots__ = ("answered", "bucket", "conn", "live", "sender", "sessions", "writing")

    def __init__(self, sessions: Sessions, conn: Connection) -> None:
        self.sessions = sessions
        self.conn = conn
        self.live: LiveSession | None = None
        self.bucket: TokenBucket | None = None
        """The connection's turn allowance, from its first turn on."""
        self.writing: asyncio.Future[Any] | None = None
        """The turn being written while the handler reads on (:meth:`_turn_soon`): its
        first try, or the task retrying it."""
        self.answered: asyncio.Future[None] | None = None
        """Set once :attr:`writing` is over, for the handler waiting on it (:meth:`_turned`)."""
        self.sender: asyncio.Task[None] | None = None
        """The writer that the last turn's answer had to start: the next frame waits for it."""

    async def run(self) -> None:
        sessions, conn = self.sessions, self.conn
        ws, protocol = conn.ws, conn.protocol
        sessions.metrics.connections_active.inc()
        sessions.connections.add(conn)
        loop = asyncio.get_running_loop()
        # Until its hello, a connection holds a socket and memory for nothing: bounded.
        hellos = sessions.hellos
        hello_by = None if hellos is None else hellos.add(self._hello_overdue)
        try:
            while protocol.close_reason is None:
                message = await ws.recv()
                if self.writing is not None or self.sender is not None:
                    await self._turned()  # the turn before this frame is answered first
                    if protocol.close_reason is not None:
                        break  # as if the frame had not been read: the turn failed
                if isinstance(message, bytes):
                    protocol.receive_binary(message)
                    event = None
                else:
                    event = protocol.receive_text(message)
                if isinstance(event, Hello):
                    if hello_by is not None:
                        hello_by.cancel()
                        hello_by = None
                    if sessions.draining:
                        protocol.close(SERVICE_RESTART)
                    else:
                        self.live = await self._hello(event)
                    forget_upgrade(ws)
                    live_call = self.live is not None and isinstance(protocol, TwilioStream)
                    if live_call and isinstance(ws, ClientSocket):
                        ws.take_now = self._media_now  # a call's audio, relayed as it is read
                elif isinstance(event, Forward):
                    self._forward(event)
                    continue  # nothing to write back
                elif isinstance(event, Turn):
                    if self._may_turn(event, loop.time()) and not self._turn_soon(event):
                        await self._turn(event)
                elif isinstance(event, Ack):
                    assert self.live is not None
                    self.live.life.ack(conn, event.seq)
                elif isinstance(event, Bye):
                    await self._bye()
                # An idle connection must not hold its last frame (a hello, a turn).
                del message, event
                if not conn.sending and not conn.write_now():
                    await conn.send()
        except ConnectionClosed as exc:
            if exc.sent is not None and exc.sent.code == 1009:
                # websockets refused a frame above the hard limit before we saw it.
                sessions.metrics.protocol_errors.labels("message_too_big").inc()
        except Exception:
            self._unexpected()
        finally:
            if hello_by is not None:
                hello_by.cancel()  # let go of this handler now, not at the deadline
            if isinstance(ws, ClientSocket):
                ws.take_now = None  # it holds this handler: no cycle left behind
            if self.writing is not None and self._cancelled():
                self.writing.cancel()  # the write stops with the handler, as in _turn
            await self._turned()
            await self._closed()

    def _unexpected(self) -> None:
        """A bug: log it and close the connection; the client resumes."""
        log.exception("unexpected error on a client connection")
        self.conn.protocol.fail(ErrorCode.INTERNAL_ERROR, "unexpected error; reconnect to resume")

    @staticmethod
    def _cancelled() -> bool:
        task = asyncio.current_task()
        return task is not None and task.cancelling() > 0

    def _hello_overdue(self) -> None:
        """No hello in time: fail the connection (from :attr:`Sessions.hellos`; :meth:`run`
        cancels the deadline at the hello and when it ends, so the handler is still on)."""
        conn = self.conn
        conn.protocol.fail(
            ErrorCode.HELLO_TIMEOUT,
            f"no hello within {self.sessions.limits.hello_timeout} s of connecting",
        )
        conn.flush()

    async def _closed(self) -> None:
        sessions, conn, protocol = self.sessions, self.conn, self.conn.protocol
        if protocol.phone and protocol.error_code is not None:
            # A Twilio stream gets no error frame: the log is the only place that says why.
            log.warning(
                "twilio stream closed error=%s message=%s",
                protocol.error_code,
                protocol.error_message,
            )
        sessions.metrics.connections_active.dec()
        sessions.connections.discard(conn)
        if conn.tenant is not None:
            sessions.count_tenant(conn.tenant, -1)
        if self.live is not None:
            self.live.detach(conn)
        # The handler's return closes the connection: send the error frame and the
        # close code first.
        with contextlib.suppress(ConnectionClosed):
            while conn.writer is not None:
                await conn.writer
            await conn.send()
        conn.finished = True
        if conn.drained is not None:
            conn.drained.set()

    def _media_now(self, text: str) -> bool:
        """Relay ``text`` to the agent as it is read if it is a caller's audio (see
        :func:`~gateway.transport.websocket.taken_now`); else leave it to :meth:`run`."""
        protocol = self.conn.protocol
        assert isinstance(protocol, TwilioStream)
        if self.writing is not None:
            return False  # a key press is being written: what follows it waits
        frame = protocol.media_now(text)
        if frame is None:
            return False
        self._forward(Forward(frame))
        return True

    def _forward(self, event: Forward) -> None:
        """A phone caller's audio: to the agent now, or never (it is not stored)."""
        live = self.live
        if live is None:
            return  # the hello was abandoned (stream gone mid-restore)
        link = live.link if live.client is self.conn else None
        if link is not None:
            link.send(event.frame, droppable=True)
        else:
            self.sessions.metrics.media_frames["to_agent", "dropped"].inc()

    async def _hello(self, hello: Hello) -> LiveSession | None:
        sessions, conn = self.sessions, self.conn
        resume_token = hello.resume_token
        if sessions.verifier is not None and not conn.protocol.phone:
            grant = self._authorize(hello)
            if grant is None:
                return None
            if not grant.bound and resume_token is None:
                # A token for the number or user, not this call: it opens a new session,
                # and resumes one only with that session's resume token.
                resume_token = TOKEN_REQUIRED
        return await Opening(sessions, conn, hello, resume_token).run()

    def _authorize(self, hello: Hello) -> Grant | None:
        """Check the hello's token; fail the connection if it is bad.

        Returns:
            The grant, or ``None`` when the connection was failed.
        """
        sessions = self.sessions
        assert sessions.verifier is not None
        token = hello.token or upgrade_token(self.conn.ws.request)
        try:
            if token is None:
                raise AuthError("missing_token", "a signed token is required")
            grant = sessions.verifier.verify(token)
            if not grant.allows(hello.caller):
                if grant.caller.tenant != hello.caller.tenant:
                    raise AuthError("wrong_tenant", "the token is for another tenant")
                raise AuthError("wrong_caller", "the token is for another caller")
        except AuthError as exc:
            sessions.metrics.auth_failures.labels(exc.code).inc()
            log.warning("hello refused auth=%s tenant=%s", exc.code, hello.caller.tenant)
            code = ErrorCode.TOKEN_EXPIRED if exc.code == "expired_token" else ErrorCode.AUTH_FAILED
            self.conn.protocol.fail(code, exc.message)
            return None
        return grant

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

    def _may_turn(self, turn: Turn, now: float) -> bool:
        """Whether ``turn`` may go on to be written: not past the connection's turn rate
        (else the connection fails), not after a turn still unstored (else it is nacked)."""
        live, conn = self.live, self.conn
        assert live is not None
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

    def _turn_soon(self, turn: Turn) -> bool:
        """Start writing ``turn`` and go back to reading, if nothing makes it wait: the
        session neither degraded nor locked. Its reply is handled by :meth:`_turn_done`,
        a callback, so that a turn wakes no task but the reader's; :meth:`run` acts on
        no frame before the turn is answered. ``False``: await :meth:`_turn` instead."""
        live = self.live
        assert live is not None
        if live.recovered is not None or not live.lock.try_acquire():
            return False
        try:
            write = self._planned(turn)
            if write is None:
                live.lock.release()
                return True
            session, sessions = live.session, self.sessions
            assert session is not None
            started = time.perf_counter()
            pending = asyncio.ensure_future(
                sessions.store.write_turn(live.caller, session.session_id, write)
            )
        except BaseException:
            live.lock.release()
            raise
        self.writing = pending
        pending.add_done_callback(functools.partial(self._turn_done, turn, session, write, started))
        return True

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
            self._unexpected()
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
        """Retry ``turn``'s write after its first try failed, as :meth:`_turn` would."""
        sessions, live = self.sessions, self.live
        assert live is not None
        try:
            await asyncio.sleep(delay)
            written = await tries.run(
                lambda: sessions.store.write_turn(live.caller, session.session_id, write)
            )
        except StoreError as exc:
            self._not_written(turn, session, write, exc)
        except Exception:
            self._unexpected()
        else:
            self._written(turn, session, write, written)
        finally:
            self._turn_over(started)

    def _turn_over(self, started: float) -> None:
        """A turn's write is done: time it, let go of the session, send the answer."""
        assert self.live is not None
        self.sessions.metrics.store_op_seconds["write_turn"].observe(time.perf_counter() - started)
        self.live.lock.release()
        self.writing = None
        # As when the handler sent its answers itself, the next frame waits until a client
        # slow to read has taken this one (see _turned).
        self.sender = self.conn.send_soon()
        answered, self.answered = self.answered, None
        if answered is not None and not answered.done():
            answered.set_result(None)

    async def _turned(self) -> None:
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

    async def _turn(self, turn: Turn) -> None:
        """Write ``turn`` as the session's lifecycle plans it, and answer it (when
        :meth:`_turn_soon` cannot)."""
        live = self.live
        assert live is not None
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
                    lambda: sessions.store.write_turn(live.caller, session.session_id, write),
                )
            except StoreError as exc:
                self._not_written(turn, session, write, exc)
                return
            self._written(turn, session, write, written)

    def _planned(self, turn: Turn) -> TurnWrite | None:
        """Plan ``turn`` (the session locked): the write the store must take, or ``None``
        when it was answered already."""
        live, sessions, conn = self.live, self.sessions, self.conn
        assert live is not None
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
        assert live is not None
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
        assert self.live is not None
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
        assert self.live is not None
        self.live.life.acked(turn)

    def _nack(self, turn: Turn, why: str) -> None:
        """Tell the client its turn was not stored and to send it again, staying connected.

        Until that turn is acked, the connection's later turns are nacked too: each must
        land after the ones sent before it.
        """
        assert self.live is not None
        self.live.life.nacked(self.conn, turn)
        self.sessions.metrics.turns.labels("nacked").inc()
        # Spread: every session of an outage must not come back at the same instant.
        wait = round(random.uniform(1.0, 3.0), 1)
        self.conn.protocol.send_nack(
            turn.turn_id, ErrorCode.STORE_UNAVAILABLE, why, retry_after=wait
        )

    async def _bye(self) -> None:
        sessions, conn, live = self.sessions, self.conn, self.live
        assert live is not None
        if not await live.restored():
            conn.protocol.fail(
                ErrorCode.STORE_UNAVAILABLE, "bye not saved: store unavailable; reconnect"
            )
            return
        async with live.lock:
            session = live.life.end(conn)
            if session is None:
                return
            sid, epoch = session.session_id, session.epoch
            try:
                await sessions.call(
                    "end",
                    lambda: sessions.store.end(live.caller, sid, sessions.clock(), epoch=epoch),
                )
            except StoreConflict as exc:
                conn.protocol.fail(ErrorCode.SESSION_CONFLICT, f"{exc.detail}; reconnect to resume")
                return
            except StoreError:
                conn.protocol.fail(
                    ErrorCode.STORE_UNAVAILABLE, "bye not saved: store unavailable; reconnect"
                )
                return
            conn.protocol.close(BYE)
            live.life.ended()
            sessions.metrics.sessions_active.dec()
            live.drop(final=agent.session_end(session))
            log.info("session end session=%s", session.session_id)


def upgrade_token(request: Request | None) -> str | None:
    """The token a browser put in the upgrade: ``?token=`` or a ``hangon.token.`` subprotocol."""
    if request is None:
        return None
    for header in request.headers.get_all("Sec-WebSocket-Protocol"):
        for offered in header.split(","):
            offered = offered.strip()
            if offered.startswith(TOKEN_SUBPROTOCOL):
                return offered[len(TOKEN_SUBPROTOCOL) :]
    _, _, query = request.path.partition("?")
    if query:
        tokens = urllib.parse.parse_qs(query).get("token")
        if tokens:
            return tokens[0]
    return None
