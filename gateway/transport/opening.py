"""A hello, from admission to an attached session: restore, refuse, fence or degrade.

:class:`Opening` carries one hello through: the tenant cap, admission (a phone
stream is never shed), the restore under the session's lock, and what the
:class:`~gateway.core.lifecycle.Lifecycle` decides about what the store returned
(:meth:`~gateway.core.lifecycle.Lifecycle.attach`). If the store stays unreachable past
``degrade_after`` and nothing of the caller is held here, the session opens
*degraded* instead, and the opening keeps trying the real restore in the background.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Iterator

from websockets.protocol import State

from gateway.core.closecodes import SERVICE_RESTART, ErrorCode
from gateway.core.events import Hello
from gateway.core.lifecycle import Abandoned, Attached, Refusal
from gateway.core.session import (
    ResumeToken,
    Session,
    empty_state,
    new_resume_token,
    new_session_id,
)
from gateway.core.wire import Welcome
from gateway.exceptions import StoreError
from gateway.store.base import Restored
from gateway.transport.connection import Connection
from gateway.transport.relay import Relay
from gateway.transport.sessions import LiveSession, Sessions, log_failure

__all__ = ["Opening"]

log = logging.getLogger("gateway.client")


class Opening:
    """One hello on its way to a session.

    Args:
        resume_token: The token to restore with: the hello's, or
            :data:`~gateway.core.lifecycle.TOKEN_REQUIRED`.
    """

    __slots__ = ("candidate", "conn", "hello", "resume_token", "sessions")

    def __init__(
        self, sessions: Sessions, conn: Connection, hello: Hello, resume_token: str | None
    ) -> None:
        self.sessions = sessions
        self.conn = conn
        self.hello = hello
        self.resume_token = resume_token
        self.candidate: Session | None = None
        """The new session every restore attempt offers, made once the hello is admitted:
        the same one each time, so that a retry whose first try landed is recognised."""

    async def run(self) -> LiveSession | None:
        """Admit the hello and open its session; ``None`` if the connection was failed."""
        sessions, conn, protocol = self.sessions, self.conn, self.conn.protocol
        tenant = self.hello.caller.tenant
        cap = sessions.limits.max_tenant_connections
        if cap is not None and sessions.tenant_connections.get(tenant, 0) >= cap:
            protocol.fail(
                ErrorCode.TENANT_LIMIT,
                f"this tenant holds {cap} connections on this instance already",
                retry_after=5.0,
            )
            return None
        if conn.tenant is None:
            conn.tenant = tenant
            sessions.count_tenant(tenant, 1)
        admission = sessions.admission
        # A phone stream is never shed: Twilio cannot wait for a hint, only re-attach at once.
        if admission.full() and not protocol.phone:
            sessions.metrics.shed.labels("hello").inc()
            protocol.fail(
                ErrorCode.OVERLOADED,
                "too many callers are reconnecting; come back after retry_after seconds",
                retry_after=admission.retry_after(),
            )
            return None
        async with admission.slot():
            if conn.ws.state is not State.OPEN or protocol.close_reason is not None:
                # The client left while it waited: restoring for nobody would take the
                # session from wherever it reconnected.
                return None
            if sessions.draining:
                protocol.close(SERVICE_RESTART)  # queued before the drain began
                return None
            return await self._admitted()

    async def _admitted(self) -> LiveSession | None:
        sessions, caller = self.sessions, self.hello.caller
        while True:
            live = sessions.live_for(caller)
            async with live.lock:
                if sessions.live.get(caller) is not live:
                    continue  # dropped while we waited for it: take the new one
                opened = await self._open(live)
                if live.session is None and sessions.live.get(caller) is live:
                    del sessions.live[caller]
                return live if opened else None

    def _restore(self) -> Awaitable[Restored]:
        """One restore attempt for the hello."""
        sessions, hello = self.sessions, self.hello
        assert self.candidate is not None
        return sessions.store.restore(
            hello.caller,
            token=self.resume_token,
            candidate=self.candidate,
            now_ms=sessions.clock(),  # a retry late in an outage must not write a past lease
            last_seq=hello.last_seq,
            owner=sessions.instance,
        )

    async def _open(self, live: LiveSession) -> bool:
        """Restore the session, attach the connection and tell the agent; under the lock."""
        sessions, conn = self.sessions, self.conn
        now = sessions.clock()
        self.candidate = Session(new_session_id(), new_resume_token(), 0, empty_state(), now, now)
        after = sessions.config.store.degrade_after
        degrade = after is not None and live.session is None
        try:
            restored = await sessions.call(
                "restore", self._restore, budget=after if degrade else None
            )
        except StoreError as exc:
            if degrade and exc.retryable and conn.ws.state is State.OPEN:
                self._open_degraded(live)
                return True
            sessions.metrics.restores.labels("error").inc()
            log.warning("restore failed caller=%s error=%s", sessions.who(self.hello.caller), exc)
            conn.protocol.fail(
                ErrorCode.STORE_UNAVAILABLE, "session store unavailable; reconnect to retry"
            )
            return False
        return self._attach(live, restored, self.resume_token)

    def _open_degraded(self, live: LiveSession) -> None:
        """Open a session the store could not be asked about: new, empty and held here only.

        The client gets a ``welcome`` with ``degraded: true``; its turns wait (bounded) for
        the store. A task keeps trying the real restore; once it lands, a second
        ``welcome`` says what the store holds, and the session goes on as any other. A
        transient store error never refuses a session start.

        The degraded welcome hands back the resume token the client presented (none if
        it presented none): a client that drops before the store answers must come back
        with a token the store knows.
        """
        sessions, conn, candidate = self.sessions, self.conn, self.candidate
        assert candidate is not None
        sessions.metrics.restores.labels("degraded").inc()
        log.warning("session open degraded: store unreachable session=%s", candidate.session_id)
        live.life.open_degraded(conn, candidate)
        sessions.by_sid[candidate.session_id] = live
        live.phone = conn.protocol.phone
        sessions.metrics.sessions_active.inc()
        live.recovered = asyncio.Event()
        shown = dataclasses.replace(
            candidate, resume_token=ResumeToken(self.hello.resume_token or "")
        )
        conn.protocol.send_welcome(Welcome(shown, degraded=True))
        live.recovery = asyncio.create_task(self._recover(live))
        live.recovery.add_done_callback(log_failure)

    async def _recover(self, live: LiveSession) -> None:
        """Restore a degraded session for real, as soon as the store answers.

        However it ends, the turns waiting on :attr:`LiveSession.recovered` go on.
        """
        sessions, conn = self.sessions, self.conn
        event = live.recovered
        try:
            delays: Iterator[float] | None = None
            while live.life.recovering(conn):
                try:
                    restored = await sessions.call("restore", self._restore)
                    break
                except StoreError as exc:
                    if not exc.retryable:
                        log.warning(
                            "degraded session not restored session=%s error=%s",
                            live.session and live.session.session_id,
                            exc,
                        )
                        async with live.lock:
                            if live.client is conn:
                                live.fail(
                                    ErrorCode.STORE_UNAVAILABLE,
                                    "session store unavailable; reconnect",
                                )
                        return
                if delays is None:
                    delays = iter(sessions.delays())
                await asyncio.sleep(next(delays, 1.0))
            else:
                return  # the client left, or the session was dropped
            async with live.lock:
                if live.recovery is asyncio.current_task():
                    live.recovery = None
                if not live.life.recovering(conn):
                    return  # the next restore, wherever it happens, takes it from the store
                if not self._attach(live, restored, self.hello.resume_token):
                    live.drop()
                conn.flush()
        finally:
            if event is not None:
                event.set()
            if live.recovered is event:
                live.recovered = None

    def _attach(self, live: LiveSession, restored: Restored, token: str | None) -> bool:
        """Carry out what the lifecycle decides about a restore: refuse, or welcome,
        replay, start the tasks and the agent."""
        sessions, conn, hello = self.sessions, self.conn, self.hello
        protocol, caller, metrics = conn.protocol, hello.caller, sessions.metrics
        metrics.restores.labels(restored.outcome.value).inc()
        decision = live.life.attach(
            conn,
            restored,
            open=conn.ws.state is State.OPEN,
            last_seq=hello.last_seq,
            token=token,
            fenced=sessions.fenced,
        )
        if isinstance(decision, Abandoned):
            return False
        if isinstance(decision, Refusal):
            if restored.session is None:
                if decision.replayed:
                    metrics.auth_failures.labels("resume_token_replayed").inc()
                    log.warning(
                        "hello refused: retired resume token caller=%s", sessions.who(caller)
                    )
                log.info(
                    "hello refused outcome=%s caller=%s",
                    restored.outcome.value,
                    sessions.who(caller),
                )
            protocol.fail(decision.code, decision.message)
            return False
        self._take(live, restored, decision)
        return True

    def _take(self, live: LiveSession, restored: Restored, decision: Attached[Connection]) -> None:
        sessions, conn, metrics = self.sessions, self.conn, self.sessions.metrics
        protocol, session = conn.protocol, decision.session
        if restored.displaced is not None:
            metrics.takeovers.labels("remote").inc()
            sessions.background(sessions.notify(restored.displaced, session))
        if decision.replaced:
            # What this instance held went stale or was replaced: its agent link, pump
            # and unread agent frames belong to another session.
            if live.relay is not None:
                live.relay.close_link()
            live.stop_tasks()
            live.relay = None
        if decision.displaced is not None:
            decision.displaced.protocol.fail(
                ErrorCode.SESSION_REPLACED, "a newer connection resumed this session"
            )
            decision.displaced.flush()
            metrics.takeovers.labels("local").inc()
        elif decision.counted:
            metrics.sessions_active.inc()
        if live.linger is not None:
            live.linger.cancel()
            live.linger = None
        if live.recovered is not None:
            # A degraded session, now restored (here, or by another hello): its waiting
            # turns go on, and its recovery, if it is not what called, has nothing left.
            live.recovered.set()
            live.recovered = None
            if live.recovery is not None and live.recovery is not asyncio.current_task():
                live.recovery.cancel()
                sessions.background(live.recovery)
            live.recovery = None
        if decision.previous is not None and sessions.by_sid.get(decision.previous) is live:
            del sessions.by_sid[decision.previous]
        sessions.by_sid[session.session_id] = live
        live.phone = protocol.phone
        replay = restored.replay
        protocol.send_welcome(decision.welcome)
        for offset, data in enumerate(restored.messages):
            protocol.send_msg(replay.start + offset, data)
        conn.sent_seq = session.seq
        metrics.replays.labels("partial" if replay.partial else "full").inc()
        if decision.missed:
            metrics.messages.labels("dropped").inc(decision.missed)
        if restored.messages:
            metrics.messages.labels("replayed").inc(len(restored.messages))
        if sessions.downstream is not None and live.relay is None:
            live.relay = Relay(live)
        live.start_tasks()
        if live.relay is not None:
            live.relay.dial(fresh=decision.fresh)
        log.info(
            "session open outcome=%s session=%s tenant=%s version=%d seq=%d replayed=%d%s",
            restored.outcome.value,
            session.session_id,
            self.hello.caller.tenant,
            session.version,
            session.seq,
            len(restored.messages),
            " partial" if replay.partial else "",
        )
