"""Drive :class:`gateway.core.protocol.Protocol` over client WebSockets, and relay the agent.

Each caller key served here has one :class:`LiveSession`: the session as last
written, the client connection attached to it (if any), its link to the voice
agent and a pump that persists and relays what the agent sends. A lock per
live session orders every write to it (turns, the agent's patches and
messages, a resume), so versions and sequence numbers never race in this
process; the store's epoch check refuses writes from anywhere else.

A client connection's handler reads and acts on frames strictly in order (a
turn is written and acknowledged before the next frame is read) and then sends
what the protocol queued. What other tasks queue (the agent's messages, a
takeover's error) is sent by a writer task that lives only until the queue is
empty; one sender at a time keeps frames in queue order. Nothing ever waits on
a client's socket while holding the session lock, so a half-open connection
cannot hold up the client that replaces it. An idle connection has one task,
its handler, as in a bare websockets server.

When the client drops without ``bye``, the session lingers for
``agent_linger`` seconds: the agent link stays open and what the agent says
is stored for the client's return. A hello within that time on this instance
adopts the lingering session.

Across instances, every restore makes its instance the session's owner and
bumps the epoch. The instance it displaced hears of it (:meth:`ClientContext.
taken_over`, fed by the store's takeover notifications) and closes its client
with ``session_replaced`` and its agent link; if the notification is lost, the
next renewal finds the epoch moved on and does the same with
``session_conflict``. Either way the epoch check has already refused its writes.

A drain (:meth:`ClientContext.drain`) closes every session at a random moment
within the drain period: the agent link stops, what the agent had sent is
persisted and relayed, then the client is closed with 1012 and resumes on
another instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request
from websockets.protocol import State

from gateway.config import LimitsConfig
from gateway.core import agent, codec
from gateway.core.auth import AuthError, Grant, Verifier
from gateway.core.callerkey import CallerKey
from gateway.core.closecodes import BYE, SERVICE_RESTART
from gateway.core.events import Ack, Bye, Forward, Hello, Turn
from gateway.core.protocol import Protocol
from gateway.core.ratelimit import TokenBucket
from gateway.core.resume import Outcome
from gateway.core.session import (
    Push,
    ResumeToken,
    Session,
    SessionId,
    TurnWrite,
    empty_state,
    merge_patch,
    new_resume_token,
    new_session_id,
)
from gateway.core.twilio import TwilioStream
from gateway.exceptions import StoreConflict, StoreError
from gateway.metrics import Metrics
from gateway.store.base import Restored, SessionStore
from gateway.store.retry import retry
from gateway.transport.admission import Admission
from gateway.transport.connection import Connection, Outbound
from gateway.transport.downstream import AgentLink, Inbox

__all__ = [
    "TOKEN_SUBPROTOCOL",
    "ClientContext",
    "LiveSession",
    "handle_client",
    "now_ms",
    "upgrade_token",
]

log = logging.getLogger("gateway.client")
T = TypeVar("T")

_REFUSALS = {
    Outcome.REFUSED: ("resume_refused", "the resume token does not match this session"),
    Outcome.ENDED: ("session_ended", "this call ended with bye; a new call needs a new call_id"),
}
_BATCH = 64
"""Agent frames persisted in one store write at most."""
_FENCED = 4096
"""Takeovers remembered for sessions not (yet) served here: a restore in flight loses."""
_ACLOSE_TIMEOUT = 10.0
"""Seconds a shutdown waits for background closes (agent links, stopped tasks)."""
_FLUSH_TIMEOUT = 5.0
"""Seconds a drain waits for a session's agent output to be persisted."""
_DEGRADED_WAIT = 10.0
"""Seconds a turn or bye waits for a degraded session's store when retries are unbounded."""
TOKEN_SUBPROTOCOL = "hangon.token."
"""Prefix of the subprotocol that carries a browser's token: ``new WebSocket(url,
["hangon.v1", "hangon.token." + token])``; the gateway answers ``hangon.v1``."""
_RESUME_TOKEN_REQUIRED = "\x00required"
"""Stands for a missing resume token that the grant requires: it matches no session's, so
an existing session with turns is refused rather than resumed."""


def now_ms() -> int:
    """Wall-clock milliseconds: stored timestamps are compared across instances."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True, eq=False)
class LiveSession:
    """A caller's session as this instance serves it."""

    caller: CallerKey
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    session: Session | None = None
    """``None`` until the first restore completes."""
    client: Connection | None = None
    link: AgentLink | None = None
    inbox: Inbox | None = None
    """The agent's frames waiting for the pump; made with the first agent link (see
    :func:`_inbox`), so that sessions without an agent do not carry one."""
    acked_seq: int = 0
    """The newest message the client acknowledged; older ones may leave the store."""
    pump: asyncio.Task[None] | None = None
    """Persists and relays the agent's frames; only with an agent."""
    renewal: asyncio.TimerHandle | asyncio.Task[None] | None = None
    """The timer of the next renewal, or the renewal under way (see :func:`_renew`). A
    timer, not a task asleep: ten thousand idle sessions hold ten thousand small handles."""
    linger: asyncio.TimerHandle | None = None
    unsaved: int = 0
    """Agent frames the pump took from the inbox and has not persisted yet."""
    gone: bool = False
    """Dropped from this instance: ended, moved elsewhere, or lingered out."""
    phone: bool = False
    """Its last client was a phone stream: the agent's audio, marks and clears are for it."""
    recovered: asyncio.Event | None = None
    """Set while the session is degraded (opened without the store); set once its real
    restore is done. Turns wait on it."""
    recovery: asyncio.Task[None] | None = None
    """Keeps trying the real restore of a degraded session."""
    unsure: TurnWrite | None = None
    """A turn write whose outcome is unknown (the store failed mid-write and the client was
    told to re-send): the re-sent turn retries this very write, so that the store can tell
    whether it landed."""


@dataclass(slots=True, kw_only=True)
class ClientContext:
    """What every client connection shares."""

    store: SessionStore
    metrics: Metrics
    max_message_size: int
    max_state_size: int
    default_region: str | None
    touch_interval: float
    """Seconds between renewals of a connected session's TTL and age."""
    delays: Callable[[], Iterable[float]]
    """A new sequence of retry delays per store operation."""
    retry_budget: float | None = None
    """Seconds after a store operation's first try past which it is not retried."""
    clock: Callable[[], int] = now_ms
    downstream: str | None = None
    """The voice agent's URL; ``None``: no agent, sessions only store state."""
    agent_delays: Callable[[], Iterator[float]] = lambda: iter(())
    """A new endless sequence of redial delays per agent outage."""
    agent_open_timeout: float = 5.0
    agent_linger: float = 30.0
    """Seconds a session stays here after its client dropped, storing what the agent says."""
    instance: str = ""
    """This instance's ID: the owner it writes into the sessions it serves."""
    twilio_caller_param: str = "From"
    """The Twilio ``<Stream>`` custom parameter that holds the caller's number."""
    admission: Admission = field(default_factory=lambda: Admission.from_limits(LimitsConfig()))
    """How many hellos restore at once, and how many may wait."""
    verifier: Verifier | None = None
    """Checks client tokens; ``None``: authentication off (a Twilio stream is vouched for
    by its signature instead)."""
    turn_rate: float | None = None
    """Turns per second a connection may send on average; ``None``: any."""
    turn_burst: int = 40
    hello_timeout: float | None = None
    """Seconds a connection has to say hello; ``None``: forever."""
    max_tenant_connections: int | None = None
    """Connections that said hello one tenant may hold here; ``None``: any."""
    outbound: Outbound = Outbound()
    """How long a client may take to read, and how much may wait for it."""
    degrade_after: float | None = None
    """Seconds a hello waits for an unreachable store before its session opens degraded;
    ``None``: it waits through every retry, then gets ``store_unavailable``."""
    tenant_connections: dict[str, int] = field(default_factory=dict)
    """Connections that said hello, by tenant."""
    live: dict[CallerKey, LiveSession] = field(default_factory=dict)
    """Sessions served here, by caller key."""
    by_sid: dict[SessionId, LiveSession] = field(default_factory=dict)
    """The same sessions, by session ID (takeover notifications name sessions)."""
    fenced: OrderedDict[SessionId, int] = field(default_factory=OrderedDict)
    """Takeovers heard of for sessions not served here: session ID to epoch."""
    connections: set[Connection] = field(default_factory=set)
    """Every open client connection, with or without a session."""
    draining: bool = False
    closing: set[asyncio.Task[None]] = field(default_factory=set)
    """Background closes (replaced connections, agent links), kept from garbage collection."""

    async def call(
        self, op: str, fn: Callable[[], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        """Run a store operation with retries, timing it.

        Args:
            budget: Seconds past which no retry starts, if shorter than
                :attr:`retry_budget`.
        """
        started = time.perf_counter()
        if budget is None or (self.retry_budget is not None and self.retry_budget < budget):
            budget = self.retry_budget
        try:
            return await retry(fn, self.delays(), budget=budget, on_error=self.metrics.store_error)
        finally:
            self.metrics.store_op_seconds[op].observe(time.perf_counter() - started)

    def who(self, caller: CallerKey) -> str:
        """The caller's keyed digest, for logs: never the phone number or user ID."""
        return self.store.settings.keyring.digest(caller)

    def background(self, coro: Awaitable[None]) -> None:
        """Run ``coro`` in the background; :meth:`aclose` waits for it, and a failure is
        logged once, here (the tasks handle the failures they expect)."""
        task = asyncio.ensure_future(coro)
        self.closing.add(task)
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Future[None]) -> None:
        self.closing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("background task failed", exc_info=exc)

    async def aclose(self) -> None:
        """Drop every session (agent links close; stored state stays) and wait for closes."""
        for live in list(self.live.values()):
            _drop(self, live)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _ACLOSE_TIMEOUT
        while self.closing:
            left = deadline - loop.time()
            if left <= 0:
                # On Python 3.11, asyncio.wait_for inside redis-py can swallow a
                # cancellation; a task that missed its own must not hold up the exit.
                log.warning("shutdown: %d background tasks did not stop", len(self.closing))
                return
            await asyncio.wait(set(self.closing), timeout=left)  # _finished retrieves them

    def taken_over(self, session_id: SessionId, epoch: int) -> None:
        """Another instance restored ``session_id`` at ``epoch``: stop serving it here."""
        live = self.by_sid.get(session_id)
        if live is None:
            # Perhaps our own restore of it is still in flight: it must not win.
            self.fenced[session_id] = max(epoch, self.fenced.get(session_id, 0))
            self.fenced.move_to_end(session_id)
            if len(self.fenced) > _FENCED:
                self.fenced.popitem(last=False)
            return
        self.background(_superseded(self, live, session_id, epoch, "session_replaced"))

    async def drain(self, period: float) -> None:
        """Close every session and connection with 1012, spread over ``period`` seconds.

        Each session's agent output is persisted and relayed before its client is
        closed. Hellos that arrive meanwhile are refused with 1012 too.
        """
        self.draining = True
        rng = random.Random()
        lives = list(self.live.values())
        results = await asyncio.gather(
            *(_drain_session(self, live, rng.uniform(0, period)) for live in lives),
            return_exceptions=True,
        )
        for live, result in zip(lives, results, strict=True):
            if isinstance(result, Exception):
                log.error("drain failed caller=%s", self.who(live.caller), exc_info=result)
        for conn in list(self.connections):
            conn.protocol.close(SERVICE_RESTART)
            conn.flush()


async def handle_client(ctx: ClientContext, ws: ServerConnection, *, twilio: bool = False) -> None:
    """Serve one client connection until it closes.

    Args:
        twilio: The client is a Twilio Media Stream (:mod:`gateway.core.twilio`),
            not a protocol v1 client.
    """
    protocol: Protocol | TwilioStream
    if twilio:
        protocol = TwilioStream(
            max_message_size=ctx.max_message_size,
            caller_param=ctx.twilio_caller_param,
            default_region=ctx.default_region,
        )
    else:
        protocol = Protocol(
            max_message_size=ctx.max_message_size, default_region=ctx.default_region
        )
    conn = Connection(ws, protocol, ctx.metrics.protocol_errors, ctx.outbound)
    live: LiveSession | None = None
    ctx.metrics.connections_active.inc()
    ctx.connections.add(conn)
    loop = asyncio.get_running_loop()
    # Until its hello, a connection holds a socket and memory for nothing: bounded.
    hello_by = None if ctx.hello_timeout is None else loop.time() + ctx.hello_timeout
    try:
        while protocol.close_reason is None:
            if hello_by is None:
                message = await ws.recv()
            else:
                try:
                    async with asyncio.timeout_at(hello_by):
                        message = await ws.recv()
                except TimeoutError:
                    protocol.fail(
                        "hello_timeout", f"no hello within {ctx.hello_timeout} s of connecting"
                    )
                    break
            if isinstance(message, bytes):
                protocol.receive_binary(message)
                event = None
            else:
                event = protocol.receive_text(message)
            if isinstance(event, Hello):
                hello_by = None
                if ctx.draining:
                    protocol.close(SERVICE_RESTART)
                else:
                    live = await _hello(ctx, conn, event)
            elif isinstance(event, Forward):
                # A phone caller's audio: to the agent now, or never (it is not stored).
                if live is None:
                    continue  # the hello was abandoned (stream gone mid-restore)
                link = live.link if live.client is conn else None
                if link is not None:
                    link.send(event.frame, droppable=True)
                else:
                    ctx.metrics.media.labels("to_agent", "dropped").inc()
                continue  # nothing to write back
            elif isinstance(event, Turn):
                assert live is not None
                if ctx.turn_rate is not None and not _allowed(ctx, conn, loop.time()):
                    assert conn.bucket is not None
                    protocol.fail(
                        "rate_limited",
                        f"more than {ctx.turn_rate:g} turns per second; resume after retry_after",
                        retry_after=round(max(1.0, conn.bucket.wait()), 1),
                    )
                else:
                    await _turn(ctx, live, conn, event)
            elif isinstance(event, Ack):
                assert live is not None
                if live.client is conn and live.session is not None:
                    live.acked_seq = max(live.acked_seq, min(event.seq, live.session.seq))
            elif isinstance(event, Bye):
                assert live is not None
                await _bye(ctx, live, conn)
            # An idle connection must not hold its last frame (a hello, a turn).
            del message, event
            if not conn.sending:
                await conn.send()
    except ConnectionClosed as exc:
        if exc.sent is not None and exc.sent.code == 1009:
            # websockets refused a frame above the hard limit before we saw it.
            ctx.metrics.protocol_errors.labels("message_too_big").inc()
    except Exception:
        log.exception("unexpected error on a client connection")
        protocol.fail("internal_error", "unexpected error; reconnect to resume")
    finally:
        if isinstance(protocol, TwilioStream) and protocol.error_code is not None:
            # A Twilio stream gets no error frame: the log is the only place that says why.
            log.warning(
                "twilio stream closed error=%s message=%s",
                protocol.error_code,
                protocol.error_message,
            )
        ctx.metrics.connections_active.dec()
        ctx.connections.discard(conn)
        if conn.tenant is not None:
            _count_tenant(ctx, conn.tenant, -1)
        if live is not None and live.client is conn:
            _detach(ctx, live)
        # The handler's return closes the connection: send the error frame and the
        # close code first.
        with contextlib.suppress(ConnectionClosed):
            while conn.writer is not None:
                await conn.writer
            await conn.send()
        conn.finished = True
        if conn.drained is not None:
            conn.drained.set()


def _allowed(ctx: ClientContext, conn: Connection, now: float) -> bool:
    """Whether the connection may send this turn under ``--max-turns-per-second``."""
    bucket = conn.bucket
    if bucket is None:
        assert ctx.turn_rate is not None
        bucket = conn.bucket = TokenBucket(ctx.turn_rate, float(ctx.turn_burst))
    return bucket.take(now)


def _count_tenant(ctx: ClientContext, tenant: str, delta: int) -> None:
    held = ctx.tenant_connections.get(tenant, 0) + delta
    if held:
        ctx.tenant_connections[tenant] = held
    else:
        del ctx.tenant_connections[tenant]
    ctx.metrics.tenant_connections.labels(ctx.metrics.tenant(tenant)).inc(delta)


def _live_for(ctx: ClientContext, caller: CallerKey) -> LiveSession:
    live = ctx.live.get(caller)
    if live is None:
        live = ctx.live[caller] = LiveSession(caller)
    return live


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


def _authorize(ctx: ClientContext, conn: Connection, hello: Hello) -> Grant | None:
    """Check the hello's token, if authentication is on; fail the connection if it is bad.

    Returns:
        The grant, or ``None`` when the connection was failed.
    """
    assert ctx.verifier is not None
    token = hello.token or upgrade_token(conn.ws.request)
    try:
        if token is None:
            raise AuthError("missing_token", "a signed token is required")
        grant = ctx.verifier.verify(token)
        if not grant.allows(hello.caller):
            if grant.caller.tenant != hello.caller.tenant:
                raise AuthError("wrong_tenant", "the token is for another tenant")
            raise AuthError("wrong_caller", "the token is for another caller")
    except AuthError as exc:
        ctx.metrics.auth_failures.labels(exc.reason).inc()
        log.warning("hello refused auth=%s tenant=%s", exc.reason, hello.caller.tenant)
        code = "token_expired" if exc.reason == "expired_token" else "auth_failed"
        conn.protocol.fail(code, exc.message)
        return None
    return grant


async def _hello(ctx: ClientContext, conn: Connection, hello: Hello) -> LiveSession | None:
    resume_token = hello.resume_token
    if ctx.verifier is not None and not isinstance(conn.protocol, TwilioStream):
        grant = _authorize(ctx, conn, hello)
        if grant is None:
            return None
        if not grant.bound and resume_token is None:
            # A token for the number or user, not this call: it opens a new session, and
            # resumes one only with that session's resume token.
            resume_token = _RESUME_TOKEN_REQUIRED
    tenant = hello.caller.tenant
    cap = ctx.max_tenant_connections
    if cap is not None and ctx.tenant_connections.get(tenant, 0) >= cap:
        conn.protocol.fail(
            "tenant_limit",
            f"this tenant holds {cap} connections on this instance already",
            retry_after=5.0,
        )
        return None
    if conn.tenant is None:
        conn.tenant = tenant
        _count_tenant(ctx, tenant, 1)
    admission = ctx.admission
    # A phone stream is never shed: Twilio cannot wait for a hint, only re-attach at once.
    if admission.full() and not isinstance(conn.protocol, TwilioStream):
        ctx.metrics.shed.labels("hello").inc()
        conn.protocol.fail(
            "overloaded",
            "too many callers are reconnecting; come back after retry_after seconds",
            retry_after=admission.retry_after(),
        )
        return None
    async with admission.slot():
        if conn.ws.state is not State.OPEN or conn.protocol.close_reason is not None:
            # The client left while it waited: restoring for nobody would take the session
            # from wherever it reconnected.
            return None
        if ctx.draining:
            conn.protocol.close(SERVICE_RESTART)  # queued before the drain began
            return None
        return await _admitted(ctx, conn, hello, resume_token)


async def _admitted(
    ctx: ClientContext, conn: Connection, hello: Hello, resume_token: str | None
) -> LiveSession | None:
    caller = hello.caller
    while True:
        live = _live_for(ctx, caller)
        async with live.lock:
            if ctx.live.get(caller) is not live:
                continue  # dropped while we waited for it: take the new one
            opened = await _open(ctx, live, conn, hello, resume_token)
            if live.session is None and ctx.live.get(caller) is live:
                del ctx.live[caller]
            return live if opened else None


def _restorer(
    ctx: ClientContext, hello: Hello, resume_token: str | None, candidate: Session
) -> Callable[[], Awaitable[Restored]]:
    """One restore attempt for ``hello``; every attempt offers the same candidate, so that
    a retry whose first try landed is recognised."""

    def restore() -> Awaitable[Restored]:
        return ctx.store.restore(
            hello.caller,
            token=resume_token,
            candidate=candidate,
            now_ms=ctx.clock(),  # a retry late in an outage must not write a past lease
            last_seq=hello.last_seq,
            owner=ctx.instance,
        )

    return restore


async def _open(
    ctx: ClientContext, live: LiveSession, conn: Connection, hello: Hello, resume_token: str | None
) -> bool:
    """Restore the session, attach ``conn`` and tell the agent; under the session lock.

    If the store stays unreachable past ``degrade_after`` and nothing of the caller is
    held here, the session opens degraded instead (:func:`_open_degraded`).
    """
    now = ctx.clock()
    protocol, caller = conn.protocol, hello.caller
    candidate = Session(new_session_id(), new_resume_token(), 0, empty_state(), now, now)
    restore = _restorer(ctx, hello, resume_token, candidate)
    degrade = ctx.degrade_after is not None and live.session is None
    try:
        restored = await ctx.call("restore", restore, budget=ctx.degrade_after if degrade else None)
    except StoreError as exc:
        if degrade and exc.retryable and conn.ws.state is State.OPEN:
            _open_degraded(ctx, live, conn, hello, candidate, restore)
            return True
        ctx.metrics.restores.labels("error").inc()
        log.warning("restore failed caller=%s error=%s", ctx.who(caller), exc)
        protocol.fail("store_unavailable", "session store unavailable; reconnect to retry")
        return False
    return _attach(ctx, live, conn, hello, restored, resume_token)


def _open_degraded(
    ctx: ClientContext,
    live: LiveSession,
    conn: Connection,
    hello: Hello,
    candidate: Session,
    restore: Callable[[], Awaitable[Restored]],
) -> None:
    """Open a session the store could not be asked about: new, empty and held here only.

    The client gets a ``welcome`` with ``degraded: true``; its turns wait (bounded) for
    the store. A task keeps trying the real restore; once it lands, a second ``welcome``
    says what the store holds, and the session goes on as any other. A transient store
    error never refuses a session start.

    The degraded welcome hands back the resume token the client presented (none if it
    presented none): a client that drops before the store answers must come back with a
    token the store knows.
    """
    ctx.metrics.restores.labels("degraded").inc()
    log.warning("session open degraded: store unreachable session=%s", candidate.session_id)
    live.session = candidate
    ctx.by_sid[candidate.session_id] = live
    live.client = conn
    live.phone = isinstance(conn.protocol, TwilioStream)
    ctx.metrics.sessions_active.inc()
    live.recovered = asyncio.Event()
    shown = dataclasses.replace(candidate, resume_token=ResumeToken(hello.resume_token or ""))
    conn.protocol.send_welcome(shown, resumed=False, stale=False, degraded=True)
    live.recovery = asyncio.create_task(_recover(ctx, live, conn, hello, restore))
    live.recovery.add_done_callback(_log_failure)


async def _recover(
    ctx: ClientContext,
    live: LiveSession,
    conn: Connection,
    hello: Hello,
    restore: Callable[[], Awaitable[Restored]],
) -> None:
    """Restore a degraded session for real, as soon as the store answers.

    However it ends, the turns waiting on :attr:`LiveSession.recovered` go on.
    """
    event = live.recovered
    try:
        delays: Iterator[float] | None = None
        while not live.gone and live.client is conn:
            try:
                restored = await ctx.call("restore", restore)
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
                            conn.protocol.fail(
                                "store_unavailable", "session store unavailable; reconnect"
                            )
                            conn.flush()
                    return
            if delays is None:
                delays = iter(ctx.delays())
            await asyncio.sleep(next(delays, 1.0))
        else:
            return  # the client left, or the session was dropped
        async with live.lock:
            if live.recovery is asyncio.current_task():
                live.recovery = None
            if live.gone or live.client is not conn:
                return  # the next restore, wherever it happens, takes it from the store
            if not _attach(ctx, live, conn, hello, restored, hello.resume_token):
                _drop(ctx, live)
            conn.flush()
    finally:
        if event is not None:
            event.set()
        if live.recovered is event:
            live.recovered = None


def _attach(
    ctx: ClientContext,
    live: LiveSession,
    conn: Connection,
    hello: Hello,
    restored: Restored,
    resume_token: str | None,
) -> bool:
    """Make what the store restored the session of ``conn``: welcome, replay, tasks, agent."""
    protocol, caller = conn.protocol, hello.caller
    outcome, session = restored.outcome, restored.session
    ctx.metrics.restores.labels(outcome.value).inc()
    if session is None:
        if restored.replayed:
            # A token the client already traded for a newer one: a copy in other hands.
            ctx.metrics.auth_failures.labels("resume_token_replayed").inc()
            log.warning("hello refused: retired resume token caller=%s", ctx.who(caller))
            protocol.fail("resume_refused", "this resume token was replaced by a newer one")
        elif outcome is Outcome.REFUSED and resume_token == _RESUME_TOKEN_REQUIRED:
            protocol.fail(
                "resume_refused", "this call's session exists: resuming it needs its resume token"
            )
        else:
            protocol.fail(*_REFUSALS[outcome])
        log.info("hello refused outcome=%s caller=%s", outcome.value, ctx.who(caller))
        return False
    if conn.ws.state is not State.OPEN:
        # The client gave up on this hello (a slow restore) and has likely reconnected;
        # taking the session over now would close its live connection. The restore did
        # start a new epoch; a connection here holding the session adopts it, or its
        # next write would be refused.
        held = live.session
        if (
            held is not None
            and live.client is not None
            and (held.session_id, held.epoch + 1, held.version, held.seq)
            == (session.session_id, session.epoch, session.version, session.seq)
        ):
            # Only when no other hello came between (anywhere): else the held connection
            # is superseded, and must stay fenced.
            held.epoch = session.epoch
        return False
    if ctx.fenced.get(session.session_id, 0) > session.epoch:
        # Another instance restored it after us, and said so before our reply came.
        protocol.fail("session_replaced", "another connection resumed this session first")
        return False
    if restored.displaced is not None:
        ctx.metrics.takeovers.labels("remote").inc()
        ctx.background(_notify(ctx, restored.displaced, session))
    if live.session is not None and live.session.session_id != session.session_id:
        # What this instance held went stale or was replaced: its agent link, pump,
        # unread agent frames and client acks belong to another session.
        _close_link(ctx, live, None)
        _stop_tasks(ctx, live)
        live.inbox = None
        live.unsaved = 0  # the cancelled pump's frames are gone with it
        live.acked_seq = 0
    old = live.client
    if old is conn:
        pass  # a degraded session, restored for real: already counted
    elif old is not None:
        old.protocol.fail("session_replaced", "a newer connection resumed this session")
        old.flush()
        ctx.metrics.takeovers.labels("local").inc()
    else:
        ctx.metrics.sessions_active.inc()
    if live.linger is not None:
        live.linger.cancel()
        live.linger = None
    if live.recovered is not None:
        # A degraded session, now restored (here, or by another hello): its waiting turns go
        # on, and its recovery, if it is not what called, has nothing left to do.
        live.recovered.set()
        live.recovered = None
        if live.recovery is not None and live.recovery is not asyncio.current_task():
            live.recovery.cancel()
            ctx.background(live.recovery)
        live.recovery = None
    live.unsure = None  # a write of the session this one replaces
    if live.session is not None and ctx.by_sid.get(live.session.session_id) is live:
        del ctx.by_sid[live.session.session_id]
    live.session = session
    ctx.by_sid[session.session_id] = live
    live.client = conn
    live.phone = isinstance(protocol, TwilioStream)
    if outcome is not Outcome.HIT:
        live.acked_seq = 0
    else:
        # What the client says it has: an ack, but never of messages not yet written.
        live.acked_seq = min(max(live.acked_seq, hello.last_seq or 0), session.seq)
    replay = restored.replay
    protocol.send_welcome(
        session,
        resumed=outcome is Outcome.HIT,
        stale=outcome is Outcome.STALE,
        replay_from=replay.start if replay.partial else None,
    )
    for offset, data in enumerate(restored.messages):
        protocol.send_msg(replay.start + offset, data)
    conn.sent_seq = session.seq
    ctx.metrics.replays.labels("partial" if replay.partial else "full").inc()
    if replay.partial and outcome is Outcome.HIT:
        # The client will never see these: the replay window had moved past them.
        missed = replay.start - (hello.last_seq or 0) - 1
        if missed > 0:
            ctx.metrics.messages.labels("dropped").inc(missed)
    if restored.messages:
        ctx.metrics.messages.labels("replayed").inc(len(restored.messages))
    _start_tasks(ctx, live)
    if ctx.downstream is not None:
        if live.link is not None:
            live.link.reopen("client_resumed")
        else:
            fresh = outcome is not Outcome.HIT and session.version == 0
            live.link = _dial(ctx, live, "start" if fresh else "client_resumed")
    log.info(
        "session open outcome=%s session=%s tenant=%s version=%d seq=%d replayed=%d%s",
        outcome.value,
        session.session_id,
        caller.tenant,
        session.version,
        session.seq,
        len(restored.messages),
        " partial" if replay.partial else "",
    )
    return True


async def _notify(ctx: ClientContext, owner: str, session: Session) -> None:
    """Tell ``owner`` that this instance took ``session`` over (best effort)."""
    try:
        await ctx.call("notify", lambda: ctx.store.notify(owner, session.session_id, session.epoch))
    except StoreError as exc:
        log.warning("takeover notice not sent session=%s error=%s", session.session_id, exc)


async def _superseded(
    ctx: ClientContext, live: LiveSession, session_id: SessionId, epoch: int, code: str
) -> None:
    """Stop serving ``live`` if its session is still ``session_id`` from before ``epoch``."""
    async with live.lock:
        session = live.session
        if live.gone or session is None or session.session_id != session_id:
            return
        if session.epoch >= epoch:
            return  # restored here again since: ours is the newest
        ctx.metrics.takeovers.labels("lost").inc()
        log.info("session taken over elsewhere session=%s epoch=%d", session_id, epoch)
        if live.client is not None:
            live.client.protocol.fail(code, "another connection resumed this session")
            live.client.flush()
        _drop(ctx, live)


async def _drain_session(ctx: ClientContext, live: LiveSession, delay: float) -> None:
    """After ``delay``: stop the agent link, persist what it sent, close the client with 1012."""
    await asyncio.sleep(delay)
    link = live.link
    if link is not None and ctx.live.get(live.caller) is live:
        live.link = None
        await link.stop()
        # The pump persists and relays what the agent sent before it was stopped.
        deadline = time.monotonic() + _FLUSH_TIMEOUT
        while (live.unsaved or _waiting(live)) and time.monotonic() < deadline:
            if live.gone:
                break
            await asyncio.sleep(0.02)
    async with live.lock:
        if live.gone:
            return
        if live.client is not None:
            live.client.protocol.close(SERVICE_RESTART)
            live.client.flush()
        _drop(ctx, live)
        _release(ctx, live)


def _release(ctx: ClientContext, live: LiveSession) -> None:
    """Give up ownership of a session no longer served here, so that the instance that
    resumes it has nobody to notify."""
    if live.session is not None:
        ctx.background(_touch(ctx, live, live.session, "release", release=True))


def _dial(ctx: ClientContext, live: LiveSession, reason: str) -> AgentLink:
    assert ctx.downstream is not None and live.session is not None

    def opening(why: str) -> bytes:
        assert live.session is not None
        client = live.client
        stream = client.protocol.stream if client is not None else None
        if why == "start":
            return agent.session_open(
                live.session, live.caller, kind="session.start", stream=stream
            )
        return agent.session_open(
            live.session, live.caller, kind="session.resume", reason=why, stream=stream
        )

    def route(frame: str | bytes) -> bool:
        """Take a phone stream's audio, mark or clear straight to the caller."""
        if not live.phone:
            return False
        try:
            parsed = agent.parse_frame(frame, max_size=ctx.max_message_size, phone=True)
        except agent.InvalidAgentFrame:
            return False  # the pump rejects it and tells the agent why
        if not isinstance(parsed, agent.Media):
            return False
        if live.link is not link:
            # A link being closed (its session replaced here): not for the current stream.
            ctx.metrics.media.labels("to_caller", "dropped").inc()
            return True
        conn = live.client
        sent = (
            conn is not None
            and isinstance(conn.protocol, TwilioStream)
            and conn.protocol.send_media(parsed)
        )
        if sent:
            assert conn is not None
            conn.flush()
        ctx.metrics.media.labels("to_caller", "relayed" if sent else "dropped").inc()
        return True

    link = AgentLink(
        ctx.downstream,
        opening=opening,
        reason=reason,
        inbox=_inbox(ctx, live),
        metrics=ctx.metrics,
        delays=ctx.agent_delays,
        max_size=ctx.max_message_size,
        open_timeout=ctx.agent_open_timeout,
        send_timeout=ctx.outbound.send_timeout,
        max_queue=ctx.outbound.max_send_queue,
        session_id=live.session.session_id,
        route=route,
    )
    return link


def _inbox(ctx: ClientContext, live: LiveSession) -> Inbox:
    if live.inbox is None:
        live.inbox = Inbox(max_size=ctx.outbound.max_send_queue)
    return live.inbox


def _waiting(live: LiveSession) -> bool:
    """Whether agent frames wait in the inbox."""
    return live.inbox is not None and not live.inbox.empty()


def _start_tasks(ctx: ClientContext, live: LiveSession) -> None:
    if live.renewal is None:
        _renew_later(ctx, live)
    if live.pump is None and ctx.downstream is not None:
        # Only an agent link feeds the pump; without an agent, no task waits on it.
        live.pump = asyncio.create_task(_pump(ctx, live))
        live.pump.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background task failed", exc_info=task.exception())


def _ack(conn: Connection, turn: Turn, version: int) -> None:
    conn.protocol.send_ack(turn.turn_id, version)
    if conn.held == turn.turn_id:
        conn.held = None  # the turns after it may go on


def _nack(ctx: ClientContext, conn: Connection, turn: Turn, why: str) -> None:
    """Tell the client its turn was not stored and to send it again, staying connected.

    Until that turn is acked, the connection's later turns are nacked too (:func:`_turn`):
    each must land after the ones sent before it.
    """
    if conn.held is None:
        conn.held = turn.turn_id
    ctx.metrics.turns.labels("nacked").inc()
    # Spread: every session of an outage must not come back at the same instant.
    wait = round(random.uniform(1.0, 3.0), 1)
    conn.protocol.send_nack(turn.turn_id, "store_unavailable", why, retry_after=wait)


async def _restored(ctx: ClientContext, live: LiveSession) -> bool:
    """Wait, bounded, until a degraded session is restored for real (at once for any other);
    ``False`` if the store stayed unreachable. Only the store knows which session a turn or
    a bye belongs to."""
    recovered = live.recovered
    if recovered is None:
        return True
    try:
        async with asyncio.timeout(ctx.retry_budget or _DEGRADED_WAIT):
            await recovered.wait()
    except TimeoutError:
        return False
    return True


async def _turn(ctx: ClientContext, live: LiveSession, conn: Connection, turn: Turn) -> None:
    if conn.held is not None and conn.held != turn.turn_id:
        _nack(ctx, conn, turn, f"an earlier turn is not stored yet: send {conn.held!r} first")
        return
    if not await _restored(ctx, live):
        _nack(ctx, conn, turn, "session store unreachable; send the turn again")
        return
    async with live.lock:
        session, protocol = live.session, conn.protocol
        if live.client is not conn or session is None:
            return  # replaced meanwhile: this connection was told and is closing
        applied = session.applied_version(turn.turn_id)
        if applied is not None:
            ctx.metrics.turns_duplicate.inc()
            _ack(conn, turn, applied)
            return
        unsure = live.unsure
        if (
            unsure is not None
            and unsure.turn_id == turn.turn_id
            and unsure.base_version == session.version
            and unsure.epoch == session.epoch
        ):
            write = unsure  # the very write that may have landed: the store can tell
        else:
            write = session.apply(turn, ctx.clock())
        live.unsure = None
        if len(write.encoded) > ctx.max_state_size:
            # Not retryable: the same turn would be refused again; the session is intact.
            protocol.fail(
                "state_too_big",
                f"the turn would grow the session state past {ctx.max_state_size} bytes",
            )
            return
        try:
            written = await ctx.call(
                "write_turn", lambda: ctx.store.write_turn(live.caller, session.session_id, write)
            )
        except StoreConflict as exc:
            log.info("turn refused session=%s reason=%s", session.session_id, exc.detail)
            protocol.fail("session_conflict", f"{exc.detail}; reconnect to resume")
            return
        except StoreError as exc:
            log.warning("turn not written session=%s error=%s", session.session_id, exc)
            if exc.retryable:
                live.unsure = write
                _nack(ctx, conn, turn, "turn not saved: session store unavailable; send it again")
            else:
                protocol.fail(
                    "store_unavailable", "turn not saved: store unavailable; reconnect, resend"
                )
            return
        if written.applied:
            session.commit(write)
            ctx.metrics.turns_applied.inc()
            if live.link is not None:
                live.link.send(agent.turn_frame(session, turn))
        else:
            # Another connection applied this turn ID first. Our copy is now behind what
            # is stored, so the next write is refused as a conflict and the client resumes.
            ctx.metrics.turns_duplicate.inc()
        _ack(conn, turn, written.version)


async def _bye(ctx: ClientContext, live: LiveSession, conn: Connection) -> None:
    if not await _restored(ctx, live):
        conn.protocol.fail("store_unavailable", "bye not saved: store unavailable; reconnect")
        return
    async with live.lock:
        session = live.session
        if live.client is not conn or session is None:
            return
        sid, epoch = session.session_id, session.epoch
        try:
            await ctx.call("end", lambda: ctx.store.end(live.caller, sid, ctx.clock(), epoch=epoch))
        except StoreConflict as exc:
            conn.protocol.fail("session_conflict", f"{exc.detail}; reconnect to resume")
            return
        except StoreError:
            conn.protocol.fail("store_unavailable", "bye not saved: store unavailable; reconnect")
            return
        conn.protocol.close(BYE)
        live.client = None
        ctx.metrics.sessions_active.dec()
        _drop(ctx, live, final=agent.session_end(session))
        log.info("session end session=%s", session.session_id)


def _detach(ctx: ClientContext, live: LiveSession) -> None:
    """The client of ``live`` went away without bye: linger, then drop."""
    live.client = None
    ctx.metrics.sessions_active.dec()
    session = live.session
    if live.link is None or ctx.agent_linger <= 0:
        _linger_over(ctx, live)  # the release touches the session too
    else:
        if session is not None:
            # Best effort: a crash skips this, and the age then counts from the last renewal.
            ctx.background(_touch(ctx, live, session, "touch on disconnect"))
        live.linger = asyncio.get_running_loop().call_later(
            ctx.agent_linger, _linger_over, ctx, live
        )


def _linger_over(ctx: ClientContext, live: LiveSession) -> None:
    """Drop ``live`` unless a client came back; under its lock, so never mid-hello."""
    live.linger = None
    if not live.lock.locked():
        # No hello is restoring it (one waiting for the lock finds it dropped and starts
        # afresh): drop it now, without a task per disconnect.
        if live.client is None and not live.gone:
            _drop(ctx, live)
            _release(ctx, live)
        return

    async def drop() -> None:
        async with live.lock:
            if live.client is None and not live.gone:
                _drop(ctx, live)
                _release(ctx, live)

    ctx.background(drop())


def _drop(ctx: ClientContext, live: LiveSession, final: bytes | None = None) -> None:
    """Stop serving ``live`` here: close its agent link (after ``final``) and its tasks."""
    live.gone = True
    if ctx.live.get(live.caller) is live:
        del ctx.live[live.caller]
    if live.session is not None and ctx.by_sid.get(live.session.session_id) is live:
        del ctx.by_sid[live.session.session_id]
    if live.linger is not None:
        live.linger.cancel()
        live.linger = None
    _stop_tasks(ctx, live)
    if live.client is not None:
        live.client = None
        ctx.metrics.sessions_active.dec()
    _close_link(ctx, live, final)


def _stop_tasks(ctx: ClientContext, live: LiveSession) -> None:
    """Cancel the pump and the renewal (not the caller, if it is one of them)."""
    current = asyncio.current_task()
    for task in (live.pump, live.renewal, live.recovery):
        if task is None or task is current:
            continue
        task.cancel()
        if isinstance(task, asyncio.Task) and not task.done():
            # Shutdown waits until it has stopped. One that is done already was logged
            # by _log_failure, if it failed.
            ctx.background(task)
    live.pump = live.renewal = live.recovery = None


def _close_link(ctx: ClientContext, live: LiveSession, final: bytes | None) -> None:
    if live.link is not None:
        # stop() takes effect at once: the link sends nothing more for this session.
        ctx.background(live.link.stop(final))
        live.link = None


@dataclass(slots=True)
class _Batch:
    """Agent frames checked and ready to write; ``size`` frames of the pump's queue."""

    size: int
    patches: list[dict[str, Any]]
    messages: list[bytes]
    push: Push | None = None
    """The write last tried; retried unchanged while the session's epoch holds."""


async def _pump(ctx: ClientContext, live: LiveSession) -> None:
    """Persist what the agent sends, then relay it to the client; batch what queued up.

    A write that failed for want of a store is retried unchanged, so that a try which
    landed (its reply lost) is recognised by its push ID. If a resume re-based the
    session meanwhile, the restored session says whether it landed; if not, the same
    frames are written again on top of what was restored.
    """
    pending: list[str | bytes] = []
    batch: _Batch | None = None
    delays: Iterator[float] | None = None
    while True:
        if batch is None and live.client is not None:
            # At the pace the client reads: the inbox fills meanwhile, and holds the agent.
            await live.client.room()
        if not pending:
            pending.append(await _inbox(ctx, live).get())
        if batch is None:
            inbox = _inbox(ctx, live)
            # Bounded in bytes too: a batch held through a store outage is memory the
            # inbox no longer counts, and one batch must fit in the client's queue.
            size = sum(len(frame) for frame in pending)
            room = ctx.outbound.max_send_queue // 4
            while len(pending) < _BATCH and size < room and not inbox.empty():
                pending.append(inbox.get_nowait())
                size += len(pending[-1])
        live.unsaved = len(pending)
        async with live.lock:
            if live.gone:
                return
            if batch is None:
                batch = _check(ctx, live, pending)
            try:
                done = await _persist(ctx, live, batch)
            except Exception:
                log.exception("relay failed session=%s", live.session and live.session.session_id)
                done = "drop"
                if live.client is not None:
                    live.client.protocol.fail("internal_error", "unexpected error; reconnect")
                    live.client.flush()
                _drop(ctx, live)
        if done == "retry":
            # The store is down: keep the frames (the inbox fills and the link stops
            # reading, which holds the agent back) and try again.
            if delays is None:
                delays = iter(ctx.delays())
            await asyncio.sleep(next(delays, 1.0))
            continue
        if done == "drop":
            return
        del pending[: batch.size]
        live.unsaved = len(pending)
        batch, delays = None, None


def _check(ctx: ClientContext, live: LiveSession, frames: list[str | bytes]) -> _Batch:
    """Sort the agent's frames into patches and messages; reject the bad ones."""
    session = live.session
    assert session is not None
    batch = _Batch(len(frames), [], [])
    state = session.state  # as the patches accepted so far leave it
    for frame in frames:
        try:
            parsed = agent.parse_frame(frame, max_size=ctx.max_message_size, phone=live.phone)
            if isinstance(parsed, agent.Media):
                continue  # the link's route relays these; it only misses them mid-switch
            if isinstance(parsed, agent.AgentMessage):
                batch.messages.append(parsed.data)
                continue
            trial = merge_patch(state, parsed.patch)
            if len(codec.dumps(trial)) > ctx.max_state_size:
                raise agent.InvalidAgentFrame(
                    "state_too_big", f"the patch would grow the state past {ctx.max_state_size}"
                )
            state = trial
            batch.patches.append(parsed.patch)
        except agent.InvalidAgentFrame as exc:
            ctx.metrics.agent_errors.labels(exc.code).inc()
            log.warning("agent frame rejected session=%s %s", session.session_id, exc)
            if live.link is not None:
                live.link.send(agent.error_frame(exc))
    return batch


async def _persist(
    ctx: ClientContext, live: LiveSession, batch: _Batch
) -> Literal["ok", "retry", "drop"]:
    session = live.session
    assert session is not None
    if not batch.patches and not batch.messages:
        return "ok"
    push = batch.push
    if push is not None and push.epoch != session.epoch:
        # A resume re-based the session while this write waited for the store.
        if session.last_push == push.push_id:
            return "ok"  # it had landed: the resume restored and replayed it
        push = None
    if push is None:
        push = session.push(
            batch.patches, batch.messages, acked_seq=live.acked_seq, now_ms=ctx.clock()
        )
        batch.push = push
    try:
        await ctx.call("push", lambda: ctx.store.push(live.caller, session.session_id, push))
    except StoreConflict as exc:
        log.info("agent output refused session=%s reason=%s", session.session_id, exc.detail)
        if live.client is not None:
            live.client.protocol.fail("session_conflict", f"{exc.detail}; reconnect to resume")
            live.client.flush()
        _drop(ctx, live)
        return "drop"
    except StoreError as exc:
        log.warning("agent output not written session=%s error=%s", session.session_id, exc)
        if exc.retryable:
            return "retry"
        # The same write would be refused again: give the session up here, and let the
        # client's resume start from what the store holds.
        if live.client is not None:
            live.client.protocol.fail("store_unavailable", "agent output not saved; reconnect")
            live.client.flush()
        _drop(ctx, live)
        return "drop"
    session.commit_push(push)
    ctx.metrics.messages_stored.inc(len(push.messages))
    conn = live.client
    if conn is not None:
        if push.state is not None:
            conn.protocol.send_state(session)
        for offset, data in enumerate(push.messages):
            seq = push.base_seq + 1 + offset
            if seq > conn.sent_seq:
                conn.protocol.send_msg(seq, data)
                conn.sent_seq = seq
                ctx.metrics.messages_relayed.inc()
        conn.flush()
    return "ok"


def _renew_later(ctx: ClientContext, live: LiveSession) -> None:
    """Schedule the next renewal of a session's TTL, age and lease.

    Jitter keeps sessions that started together (after a reconnect storm) from
    renewing together.
    """
    delay = ctx.touch_interval * (0.5 + random.random() / 2)
    live.renewal = asyncio.get_running_loop().call_later(delay, _renew, ctx, live)


def _renew(ctx: ClientContext, live: LiveSession) -> None:
    """Renew a connected session, so a quiet call neither expires nor goes stale.

    A lingering session is not renewed: its age runs from the disconnect.
    """
    live.renewal = None
    session = live.session
    if live.gone:
        return
    if live.client is None or session is None:
        _renew_later(ctx, live)
        return
    live.renewal = task = asyncio.create_task(_renewal(ctx, live, session))
    task.add_done_callback(_log_failure)


async def _renewal(ctx: ClientContext, live: LiveSession, session: Session) -> None:
    try:
        await _touch(ctx, live, session, "renewal")
    except Exception:
        # Renewal must outlive surprises: an expired session mid-call is worse than a log line.
        log.exception("renewal failed session=%s", session.session_id)
    if live.renewal is asyncio.current_task():
        # Not stopped meanwhile (a renewal that finds the session superseded drops it).
        _renew_later(ctx, live)


async def _touch(
    ctx: ClientContext, live: LiveSession, session: Session, why: str, *, release: bool = False
) -> None:
    """Restart the session's TTL and age and renew the lease (or ``release`` it) in the store.

    A store failure is logged. If a newer hello superseded the session and the
    takeover notice never came, this instance stops serving it.
    """
    sid, epoch = session.session_id, session.epoch
    owner = "" if release else ctx.instance

    def touch() -> Awaitable[None]:
        return ctx.store.touch(live.caller, sid, ctx.clock(), epoch=epoch, owner=owner)

    try:
        await ctx.call("touch", touch)
    except StoreConflict:
        await _superseded(ctx, live, sid, epoch + 1, "session_conflict")
    except StoreError as exc:
        log.warning("%s failed session=%s error=%s", why, sid, exc)
