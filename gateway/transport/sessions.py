"""The live sessions of this process: who serves which caller, takeovers, renewals, drain.

Each caller key served here has one :class:`LiveSession`: its
:class:`~gateway.core.lifecycle.Lifecycle` (the session as last written, the client
attached to it, what the core decided), and what only I/O can hold: a lock, the
relay to its voice agent (:mod:`gateway.transport.relay`), the renewal timer, the
linger timer and a degraded session's recovery. A lock per live session orders
every write to it (turns, the agent's output, a resume), so versions and sequence
numbers never race in this process; the store's epoch check refuses writes from
anywhere else.

When the client drops without ``bye``, the session lingers for ``agent_linger``
seconds: the agent link stays open and what the agent says is stored for the
client's return. A hello within that time on this instance adopts the lingering
session.

Across instances, every restore makes its instance the session's owner and bumps
the epoch. The instance it displaced hears of it (:meth:`Sessions.taken_over`, fed by
the store's takeover notifications) and closes its client with ``session_replaced``
and its agent link; if the notification is lost, the next renewal finds the epoch
moved on and does the same with ``session_conflict``. Either way the epoch check has
already refused its writes.

A drain (:meth:`Sessions.drain`) closes every session at a random moment within the
drain period: the agent link stops, what the agent had sent is persisted and relayed,
then the client is closed with 1012 and resumes on another instance.
"""

from __future__ import annotations

import asyncio
import logging
import operator
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from gateway.config import Config
from gateway.core.auth import Verifier
from gateway.core.callerkey import CallerKey
from gateway.core.closecodes import SERVICE_RESTART, ErrorCode
from gateway.core.lifecycle import Lifecycle
from gateway.core.session import Session, SessionId
from gateway.exceptions import StoreConflict, StoreError
from gateway.metrics import Metrics
from gateway.store.base import SessionStore
from gateway.store.retry import Tries
from gateway.transport.admission import Admission
from gateway.transport.connection import Connection, Outbound
from gateway.transport.deadline import Deadlines

if TYPE_CHECKING:
    from gateway.transport.downstream import AgentLink, Inbox
    from gateway.transport.relay import Output, Relay

__all__ = ["LiveSession", "SessionLock", "Sessions", "now_ms"]

log = logging.getLogger("gateway.client")
T = TypeVar("T")

_FENCED = 4096
"""Takeovers remembered for sessions not (yet) served here: a restore in flight loses."""
_ACLOSE_TIMEOUT = 10.0
"""Seconds a shutdown waits for background closes (agent links, stopped tasks)."""
_FLUSH_TIMEOUT = 5.0
"""Seconds a drain waits for a session's agent output to be persisted."""
_DEGRADED_WAIT = 10.0
"""Seconds a turn or bye waits for a degraded session's store when retries are unbounded."""


def now_ms() -> int:
    """Wall-clock milliseconds: stored timestamps are compared across instances."""
    return time.time_ns() // 1_000_000


class Sessions:
    """The live sessions and client connections of this process, and what they share.

    Args:
        config: Settings; the transport reads its groups, never a copy.
        store: Where sessions are kept.
        metrics: Where they are counted.
        delays: A new sequence of retry delays per store operation.
        agent_delays: A new endless sequence of redial delays per agent outage.
        clock: Milliseconds since the epoch.
        instance: This instance's ID: the owner it writes into the sessions it serves.
        verifier: Checks client tokens; ``None``: authentication off (a Twilio stream is
            vouched for by its signature instead).
    """

    def __init__(
        self,
        config: Config,
        *,
        store: SessionStore,
        metrics: Metrics,
        delays: Callable[[], Iterable[float]],
        agent_delays: Callable[[], Iterator[float]],
        clock: Callable[[], int] = now_ms,
        instance: str = "",
        verifier: Verifier | None = None,
    ) -> None:
        self.config = config
        self.limits = config.limits
        self.store = store
        self.metrics = metrics
        self.delays = delays
        self.agent_delays = agent_delays
        self.clock = clock
        self.instance = instance
        self.verifier = verifier
        s = config.store
        self.touch_interval = max(0.1, min(s.ttl, s.max_age or s.ttl, s.owner_lease) / 3)
        """Seconds between renewals of a connected session's TTL, age and lease: a third of
        the shortest lifetime, so two renewals may fail before any runs out."""
        self.outbound = Outbound(
            send_timeout=self.limits.send_timeout,
            # A state frame and a message must always fit.
            max_send_queue=max(
                self.limits.max_send_queue,
                self.limits.max_state_size + self.limits.max_message_size,
            ),
        )
        self.admission = Admission.from_limits(self.limits)
        """How many hellos restore at once, and how many may wait."""
        timeout = self.limits.hello_timeout
        self.hellos: Deadlines[Callable[[], None]] | None = (
            None if timeout is None else Deadlines(timeout, operator.call)
        )
        """Each new connection's time to say hello: what to call when it is up."""
        self.downstream: str | None = None
        """The voice agent's URL; ``None``: no agent, sessions only store state."""
        self.tenant_connections: dict[str, int] = {}
        """Connections that said hello, by tenant."""
        self.live: dict[CallerKey, LiveSession] = {}
        """Sessions served here, by caller key."""
        self.by_sid: dict[SessionId, LiveSession] = {}
        """The same sessions, by session ID (takeover notifications name sessions)."""
        self.fenced: OrderedDict[SessionId, int] = OrderedDict()
        """Takeovers heard of for sessions not served here: session ID to epoch."""
        self.connections: set[Connection] = set()
        """Every open client connection, with or without a session."""
        self.draining = False
        self.closing: set[asyncio.Future[None]] = set()
        """Background work (closes, notices), kept from garbage collection."""

    def tries(self, *, budget: float | None = None, spent: float = 0.0) -> Tries:
        """A store operation's retries: the configured delays, counted in the metrics.

        Args:
            budget: Seconds past which no retry starts, if shorter than the
                configured ``retry_budget``.
            spent: Seconds since the operation's first try began.
        """
        limit = self.config.store.retry_budget
        if budget is None or (limit is not None and limit < budget):
            budget = limit
        return Tries(self.delays(), budget=budget, on_error=self.metrics.store_error, spent=spent)

    async def call(
        self, op: str, fn: Callable[[], Awaitable[T]], *, budget: float | None = None
    ) -> T:
        """Run a store operation with retries (see :meth:`tries`), timing it."""
        started = time.perf_counter()
        try:
            return await self.tries(budget=budget).run(fn)
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
        log_failure(task)

    def live_for(self, caller: CallerKey) -> LiveSession:
        """The caller's live session here, made if there is none."""
        live = self.live.get(caller)
        if live is None:
            live = self.live[caller] = LiveSession(caller, self)
        return live

    def count_tenant(self, tenant: str, delta: int) -> None:
        held = self.tenant_connections.get(tenant, 0) + delta
        if held:
            self.tenant_connections[tenant] = held
        else:
            del self.tenant_connections[tenant]
        self.metrics.tenant_connections.labels(self.metrics.tenant(tenant)).inc(delta)

    async def aclose(self) -> None:
        """Drop every session (agent links close; stored state stays) and wait for closes."""
        if self.hellos is not None:
            # The server stopped accepting and closed its connections first
            # (Gateway.aclose): no connection is left waiting to say hello.
            self.hellos.close()
        for live in list(self.live.values()):
            live.drop()
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
        self.background(live.superseded(session_id, epoch, ErrorCode.SESSION_REPLACED))

    async def notify(self, owner: str, session: Session) -> None:
        """Tell ``owner`` that this instance took ``session`` over (best effort)."""
        try:
            await self.call(
                "notify", lambda: self.store.notify(owner, session.session_id, session.epoch)
            )
        except StoreError as exc:
            log.warning("takeover notice not sent session=%s error=%s", session.session_id, exc)

    async def drain(self, period: float) -> None:
        """Close every session and connection with 1012, spread over ``period`` seconds.

        A lingering session (no client) is drained at once: there is no one to spread.

        Each session's agent output is persisted and relayed before its client is
        closed. Hellos that arrive meanwhile are refused with 1012 too.
        """
        self.draining = True
        rng = random.Random()
        lives = list(self.live.values())
        # Spread only what would reconnect: a lingering session has no client to send back
        # (and a hello now gets 1012), so its agent output is persisted at once.
        results = await asyncio.gather(
            *(live.drain(rng.uniform(0, period) if live.client else 0.0) for live in lives),
            return_exceptions=True,
        )
        for live, result in zip(lives, results, strict=True):
            if isinstance(result, Exception):
                log.error("drain failed caller=%s", self.who(live.caller), exc_info=result)
        for conn in list(self.connections):
            conn.protocol.close(SERVICE_RESTART)
            conn.flush()


def log_failure(task: asyncio.Future[None]) -> None:
    """Log a task's failure once (a done callback)."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.error("background task failed", exc_info=exc)


class SessionLock(asyncio.Lock):
    """A live session's lock: asyncio's, which a caller may also take without awaiting."""

    def try_acquire(self) -> bool:
        """Take the lock now if it is free and no task waits for it, as ``acquire`` would
        without suspending; else leave it (``False``)."""
        # asyncio.Lock keeps its state in _locked and _waiters (CPython 3.11 to 3.13);
        # tests/transport/test_sessions_lock.py checks that this still holds.
        if self.locked() or self._waiters:
            return False
        self._locked = True
        return True


@dataclass(slots=True, eq=False)
class LiveSession:
    """A caller's session as this instance serves it."""

    caller: CallerKey
    sessions: Sessions
    lock: SessionLock = field(default_factory=SessionLock)
    life: Lifecycle[Connection] = field(default_factory=Lifecycle)
    relay: Relay | None = None
    """The agent side: link, inbox and pump; made with the first agent link, so that
    sessions without an agent do not carry one."""
    renewal: asyncio.TimerHandle | asyncio.Task[None] | None = None
    """The timer of the next renewal, or the renewal under way (see :meth:`_renew`). A
    timer, not a task asleep: ten thousand idle sessions hold ten thousand small handles."""
    linger: asyncio.TimerHandle | None = None
    phone: bool = False
    """Its last client was a phone stream: the agent's audio, marks and clears are for it."""
    recovered: asyncio.Event | None = None
    """Set while the session is degraded (opened without the store); set once its real
    restore is done. Turns wait on it."""
    recovery: asyncio.Task[None] | None = None
    """Keeps trying the real restore of a degraded session."""

    @property
    def session(self) -> Session | None:
        return self.life.session

    @property
    def client(self) -> Connection | None:
        return self.life.client

    @property
    def gone(self) -> bool:
        return self.life.gone

    @property
    def acked_seq(self) -> int:
        return self.life.acked_seq

    @property
    def link(self) -> AgentLink[Output] | None:
        return None if self.relay is None else self.relay.link

    @property
    def inbox(self) -> Inbox[Output] | None:
        return None if self.relay is None else self.relay.inbox

    @property
    def unsaved(self) -> int:
        return 0 if self.relay is None else self.relay.unsaved

    async def restored(self) -> bool:
        """Wait, bounded, until a degraded session is restored for real (at once for any
        other); ``False`` if the store stayed unreachable. Only the store knows which
        session a turn or a bye belongs to."""
        recovered = self.recovered
        if recovered is None:
            return True
        try:
            async with asyncio.timeout(self.sessions.config.store.retry_budget or _DEGRADED_WAIT):
                await recovered.wait()
        except TimeoutError:
            return False
        return True

    def start_tasks(self) -> None:
        if self.renewal is None:
            self._renew_later()
        if self.relay is not None:
            self.relay.start()

    def stop_tasks(self) -> None:
        """Cancel the pump, the renewal and the recovery (not the caller, if it is one)."""
        current = asyncio.current_task()
        pump = None if self.relay is None else self.relay.pump
        for task in (pump, self.renewal, self.recovery):
            if task is None or task is current:
                continue
            task.cancel()
            if isinstance(task, asyncio.Task) and not task.done():
                # Shutdown waits until it has stopped. One that is done already was
                # logged by log_failure, if it failed.
                self.sessions.background(task)
        if self.relay is not None:
            self.relay.pump = None
        self.renewal = self.recovery = None

    def detach(self, conn: Connection) -> None:
        """``conn`` went away without bye: linger, then drop."""
        sessions = self.sessions
        linger = self.link is not None and sessions.config.agent.agent_linger > 0
        if self.life.detach(conn, linger=linger) is None:
            return
        sessions.metrics.sessions_active.dec()
        session = self.session
        if not linger:
            self.linger_over()  # the release touches the session too
            return
        if session is not None:
            # Best effort: a crash skips this, and the age then counts from the last renewal.
            sessions.background(self.touch(session, "touch on disconnect"))
        self.linger = asyncio.get_running_loop().call_later(
            sessions.config.agent.agent_linger, self.linger_over
        )

    def linger_over(self) -> None:
        """Drop the session unless a client came back; under its lock, so never mid-hello."""
        self.linger = None
        if not self.lock.locked():
            # No hello is restoring it (one waiting for the lock finds it dropped and
            # starts afresh): drop it now, without a task per disconnect.
            if self.life.linger_over():
                self.drop()
                self.release()
            return

        async def drop() -> None:
            async with self.lock:
                if self.life.linger_over():
                    self.drop()
                    self.release()

        self.sessions.background(drop())

    def fail(self, code: ErrorCode, message: str) -> None:
        """Fail the attached client, if any, and send what that queued."""
        client = self.client
        if client is not None:
            client.protocol.fail(code, message)
            client.flush()

    def drop(self, final: bytes | None = None) -> None:
        """Stop serving the session here: close its agent link (after ``final``) and tasks."""
        sessions = self.sessions
        if sessions.live.get(self.caller) is self:
            del sessions.live[self.caller]
        session = self.session
        if session is not None and sessions.by_sid.get(session.session_id) is self:
            del sessions.by_sid[session.session_id]
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
        self.stop_tasks()
        if self.life.drop() is not None:
            sessions.metrics.sessions_active.dec()
        if self.relay is not None:
            self.relay.close_link(final)
            # The relay points back here: kept, the pair (and the session's state) would
            # wait for a full collection, which tune_gc makes rare.
            self.relay = None

    def release(self) -> None:
        """Give up ownership of a session no longer served here, so that the instance that
        resumes it has nobody to notify."""
        if self.session is not None:
            self.sessions.background(self.touch(self.session, "release", release=True))

    async def superseded(self, session_id: SessionId, epoch: int, code: ErrorCode) -> None:
        """Stop serving the session if it is still ``session_id`` from before ``epoch``."""
        async with self.lock:
            if not self.life.superseded(session_id, epoch):
                return
            self.sessions.metrics.takeovers.labels("lost").inc()
            log.info("session taken over elsewhere session=%s epoch=%d", session_id, epoch)
            self.fail(code, "another connection resumed this session")
            self.drop()

    async def drain(self, delay: float) -> None:
        """After ``delay``: stop the agent link, persist what it sent, close with 1012."""
        await asyncio.sleep(delay)
        relay = self.relay
        if (
            relay is not None
            and relay.link is not None
            and self.sessions.live.get(self.caller) is self
        ):
            self.life.drain()
            await relay.flush(_FLUSH_TIMEOUT)
        async with self.lock:
            if self.gone:
                return
            client = self.client
            if client is not None:
                client.protocol.close(SERVICE_RESTART)
                client.flush()
            self.drop()
            self.release()

    # Renewals

    def _renew_later(self) -> None:
        """Schedule the next renewal of the session's TTL, age and lease.

        Jitter keeps sessions that started together (after a reconnect storm) from
        renewing together.
        """
        delay = self.sessions.touch_interval * (0.5 + random.random() / 2)
        self.renewal = asyncio.get_running_loop().call_later(delay, self._renew)

    def _renew(self) -> None:
        """Renew a connected session, so a quiet call neither expires nor goes stale.

        A lingering session is not renewed: its age runs from the disconnect.
        """
        self.renewal = None
        session = self.session
        if self.gone:
            return
        if self.client is None or session is None:
            self._renew_later()
            return
        self.renewal = task = asyncio.create_task(self._renewal(session))
        task.add_done_callback(log_failure)

    async def _renewal(self, session: Session) -> None:
        try:
            await self.touch(session, "renewal")
        except Exception:
            # Renewal must outlive surprises: an expired session mid-call is worse than a
            # log line.
            log.exception("renewal failed session=%s", session.session_id)
        if self.renewal is asyncio.current_task():
            # Not stopped meanwhile (a renewal that finds the session superseded drops it).
            self._renew_later()

    async def touch(self, session: Session, why: str, *, release: bool = False) -> None:
        """Restart the session's TTL and age and renew the lease (or ``release`` it).

        A store failure is logged. If a newer hello superseded the session and the
        takeover notice never came, this instance stops serving it.
        """
        sessions = self.sessions
        sid, epoch = session.session_id, session.epoch
        owner = "" if release else sessions.instance

        def touch() -> Awaitable[None]:
            return sessions.store.touch(
                self.caller, sid, sessions.clock(), epoch=epoch, owner=owner
            )

        try:
            await sessions.call("touch", touch)
        except StoreConflict:
            await self.superseded(sid, epoch + 1, ErrorCode.SESSION_CONFLICT)
        except StoreError as exc:
            log.warning("%s failed session=%s error=%s", why, sid, exc)
