"""Serve one client WebSocket: hello, turns, acks and bye, in order.

A client connection's :class:`Handler` reads and acts on frames strictly in order
(a turn is written and answered before the next frame is acted on) and then sends
what the protocol queued. A turn's write usually goes out with no await: the handler
reads on, and the store's reply is answered from a callback
(:class:`~gateway.transport.turns.Turns`). A turn or ack that arrives while the handler
waits with nothing queued does not even wake it: the socket hands it over as it is read
(:meth:`Handler._frame_now`), so that a turn wakes no task at all. What other tasks
queue (the agent's messages, a takeover's error) is sent by a writer task that lives
only until the queue is empty (:class:`~gateway.transport.connection.Connection`).
Nothing ever waits on a client's socket while holding the session lock, so a half-open
connection cannot hold up the client that replaces it. An idle connection has one task,
its handler, as in a bare websockets server.

The protocol (v1 JSON or a Twilio Media Stream) turns frames into events; the
hello goes through :class:`~gateway.transport.opening.Opening`; every turn is
planned by the session's :class:`~gateway.core.lifecycle.Lifecycle` and written by
:class:`~gateway.transport.turns.Turns`; the live sessions themselves are
:mod:`gateway.transport.sessions`'.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Awaitable

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request

from gateway.core import agent
from gateway.core.auth import AuthError, Grant
from gateway.core.closecodes import BYE, SERVICE_RESTART, ErrorCode
from gateway.core.events import Ack, Bye, Forward, Hello, Turn
from gateway.core.lifecycle import TOKEN_REQUIRED
from gateway.core.protocol import Protocol
from gateway.core.twilio import TwilioStream
from gateway.core.wire import ClientProtocol
from gateway.exceptions import StoreConflict, StoreError
from gateway.transport.connection import Connection
from gateway.transport.opening import Opening
from gateway.transport.sessions import LiveSession, Sessions, now_ms
from gateway.transport.turns import Turns
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

    __slots__ = ("conn", "live", "sessions", "turns")

    def __init__(self, sessions: Sessions, conn: Connection) -> None:
        self.sessions = sessions
        self.conn = conn
        self.live: LiveSession | None = None
        self.turns: Turns | None = None
        """The session's turns on this connection, from the hello on."""

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
                turns = self.turns
                if turns is not None and turns.busy:
                    await turns.settled()  # the turn before this frame is answered first
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
                        if self.live is not None:
                            self.turns = Turns(sessions, conn, self.live)
                    forget_upgrade(ws)
                    if self.live is not None and isinstance(ws, ClientSocket):
                        # A call's audio is relayed as it is read; a client's turns and
                        # acks are acted on as they are read.
                        phone = isinstance(protocol, TwilioStream)
                        ws.take_now = self._media_now if phone else self._frame_now
                elif isinstance(event, Forward):
                    self._forward(event)
                    continue  # nothing to write back
                elif isinstance(event, Turn):
                    turns = self.turns
                    assert turns is not None
                    if turns.may(event, loop.time()) and not turns.soon(event):
                        await turns.write(event)
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
            conn.unexpected()
        finally:
            if hello_by is not None:
                hello_by.cancel()  # let go of this handler now, not at the deadline
            if isinstance(ws, ClientSocket):
                ws.take_now = None  # it holds this handler: no cycle left behind
            if self.turns is not None:
                if self._cancelled():
                    self.turns.stop()
                await self.turns.settled()
            await self._closed()

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
        if self.turns is not None and self.turns.writing is not None:
            return False  # a key press is being written: what follows it waits
        frame = protocol.media_now(text)
        if frame is None:
            return False
        self._forward(Forward(frame))
        return True

    def _frame_now(self, text: str) -> bool:
        """Act on ``text`` as it is read if it is a turn or an ack that nothing makes wait
        (see :func:`~gateway.transport.websocket.taken_now`), as :meth:`run` would, but
        without waking it; else leave it to :meth:`run`.

        A turn's write then goes out from here (:meth:`Turns.now`), and its answer from
        the write's callback; the next frame waits for it, as in :meth:`run`."""
        turns, conn = self.turns, self.conn
        if turns is None or turns.busy:
            return False  # the frame before this one is not answered yet: the reader waits
        try:  # a bug fails the connection, as in run (taken_now would drop the frame)
            assert isinstance(conn.protocol, Protocol)
            event = conn.protocol.now(text)
            if event is None:
                return False
            if isinstance(event, Turn):
                if not turns.now(event, conn.ws.loop.time()):
                    return False
            else:
                assert self.live is not None
                self.live.life.ack(conn, event.seq)
        except Exception:
            conn.unexpected()
        # As the handler would have waited for a client slow to read this answer, the
        # next frame waits for it (Turns.busy).
        turns.sender = conn.send_soon()
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
