"""Drive :class:`gateway.core.protocol.Protocol` over one client WebSocket.

Frames of one connection are handled strictly in order: a turn is written and
acknowledged before the next frame is read, so acks leave in turn order and an
ack always follows a durable write.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TypeVar

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from gateway.core.callerkey import CallerKey
from gateway.core.closecodes import BYE
from gateway.core.events import Bye, Hello, Turn
from gateway.core.protocol import Protocol
from gateway.core.resume import Outcome
from gateway.core.session import (
    Session,
    SessionId,
    empty_state,
    new_resume_token,
    new_session_id,
)
from gateway.exceptions import StoreConflict, StoreError
from gateway.metrics import Metrics
from gateway.store.base import SessionStore
from gateway.store.retry import retry

__all__ = ["ClientContext", "LiveSession", "handle_client", "now_ms"]

log = logging.getLogger("gateway.client")
T = TypeVar("T")

_REFUSALS = {
    Outcome.REFUSED: ("resume_refused", "the resume token does not match this session"),
    Outcome.ENDED: ("session_ended", "this call ended with bye; a new call needs a new call_id"),
}


def now_ms() -> int:
    """Wall-clock milliseconds: stored timestamps are compared across instances."""
    return time.time_ns() // 1_000_000


@dataclass(slots=True)
class LiveSession:
    """A session with a client connected to this instance."""

    caller: CallerKey
    session: Session
    ws: ServerConnection
    protocol: Protocol
    ended: bool = False
    keeper: asyncio.Task[None] | None = None
    """Renews the session in the store while the client is connected."""


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
    live: dict[SessionId, LiveSession] = field(default_factory=dict)
    """Sessions connected here, to replace a half-open connection on reconnect."""
    closing: set[asyncio.Task[None]] = field(default_factory=set)
    """Replaced connections being closed in the background (kept from garbage collection)."""

    async def call(self, op: str, fn: Callable[[], Awaitable[T]]) -> T:
        """Run a store operation with retries, timing it."""
        with self.metrics.store_seconds.labels(op).time():
            return await retry(
                fn, self.delays(), budget=self.retry_budget, on_error=self.metrics.store_error
            )


async def _flush(ctx: ClientContext, ws: ServerConnection, protocol: Protocol) -> None:
    """Write queued frames; close if the protocol says so.

    An error is counted when its frame leaves the queue, before anything is sent,
    so it is counted exactly once (nothing is queued after an error frame) and
    even when the client is already gone.
    """
    frames = protocol.data_to_send()
    reason = protocol.close_reason
    if frames and reason is not None and protocol.error_code is not None:
        ctx.metrics.protocol_errors.labels(protocol.error_code).inc()
    for frame in frames:
        await ws.send(frame, text=True)
    if reason is not None and ws.state is State.OPEN:
        await ws.close(reason.code, reason.reason)


async def handle_client(ctx: ClientContext, ws: ServerConnection) -> None:
    """Serve one client connection until it closes."""
    protocol = Protocol(max_message_size=ctx.max_message_size, default_region=ctx.default_region)
    live: LiveSession | None = None
    ctx.metrics.connections_active.inc()
    try:
        while protocol.close_reason is None:
            message = await ws.recv()
            if isinstance(message, bytes):
                protocol.receive_binary(message)
                event = None
            else:
                event = protocol.receive_text(message)
            if isinstance(event, Hello):
                live = await _hello(ctx, ws, protocol, event)
            elif isinstance(event, Turn):
                assert live is not None
                await _turn(ctx, live, event)
            elif isinstance(event, Bye):
                assert live is not None
                await _bye(ctx, live)
            await _flush(ctx, ws, protocol)
    except ConnectionClosed as exc:
        if exc.sent is not None and exc.sent.code == 1009:
            # websockets refused a frame above the hard limit before we saw it.
            ctx.metrics.protocol_errors.labels("message_too_big").inc()
    except Exception:
        log.exception("unexpected error on a client connection")
        protocol.fail("internal_error", "unexpected error; reconnect to resume")
        with contextlib.suppress(ConnectionClosed):
            await _flush(ctx, ws, protocol)
    finally:
        ctx.metrics.connections_active.dec()
        if live is not None:
            await _release(ctx, live)


async def _hello(
    ctx: ClientContext, ws: ServerConnection, protocol: Protocol, hello: Hello
) -> LiveSession | None:
    now = ctx.clock()
    candidate = Session(new_session_id(), new_resume_token(), 0, empty_state(), now, now)
    caller = hello.caller
    try:
        restored = await ctx.call(
            "restore",
            lambda: ctx.store.restore(
                caller, token=hello.resume_token, candidate=candidate, now_ms=now
            ),
        )
    except StoreError as exc:
        ctx.metrics.restores.labels("error").inc()
        log.warning("restore failed caller=%s error=%s", caller.digest(), exc)
        protocol.fail("store_unavailable", "session store unavailable; reconnect to retry")
        return None
    outcome, session = restored.outcome, restored.session
    ctx.metrics.restores.labels(outcome.value).inc()
    if session is None:
        protocol.fail(*_REFUSALS[outcome])
        log.info("hello refused outcome=%s caller=%s", outcome.value, caller.digest())
        return None
    if ws.state is not State.OPEN:
        # The client gave up on this hello (a slow restore) and has likely reconnected;
        # taking the session over now would close its live connection.
        return None
    protocol.send_welcome(session, resumed=outcome is Outcome.HIT, stale=outcome is Outcome.STALE)
    live = LiveSession(caller, session, ws, protocol)
    live.keeper = asyncio.create_task(_keep_fresh(ctx, live))
    # Take the session over before any await, so that of several hellos racing for it
    # the last one registered wins and every other one is told.
    old = ctx.live.get(session.session_id)
    ctx.live[session.session_id] = live
    if old is not None:
        _replace(ctx, old)
    ctx.metrics.sessions_active.inc()
    log.info(
        "session open outcome=%s session=%s tenant=%s version=%d",
        outcome.value,
        session.session_id,
        caller.tenant,
        session.version,
    )
    return live


def _replace(ctx: ClientContext, old: LiveSession) -> None:
    """Close, in the background, a connection whose session a newer one just resumed.

    The old connection is often half-open (that is why the client came back), and
    closing it may wait ``close_timeout`` for a close frame that never comes; the
    new client's welcome must not wait for that.
    """
    old.protocol.fail("session_replaced", "a newer connection resumed this session")
    task = asyncio.create_task(_close_quietly(ctx, old))
    ctx.closing.add(task)
    task.add_done_callback(ctx.closing.discard)


async def _close_quietly(ctx: ClientContext, live: LiveSession) -> None:
    with contextlib.suppress(ConnectionClosed):
        await _flush(ctx, live.ws, live.protocol)


async def _turn(ctx: ClientContext, live: LiveSession, turn: Turn) -> None:
    session, protocol = live.session, live.protocol
    applied = session.applied_version(turn.turn_id)
    if applied is not None:
        ctx.metrics.turns.labels("duplicate").inc()
        protocol.send_ack(turn.turn_id, applied)
        return
    write = session.apply(turn, ctx.clock())
    if len(write.encoded) > ctx.max_state_size:
        # Not retryable: the same turn would be refused again; the session itself is intact.
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
        protocol.fail("store_unavailable", "turn not saved: store unavailable; reconnect, resend")
        return
    if written.applied:
        session.commit(write)
        ctx.metrics.turns.labels("applied").inc()
    else:
        # Another connection applied this turn ID first. Our copy is now behind what is
        # stored, so the next write is refused as a conflict and the client resumes.
        ctx.metrics.turns.labels("duplicate").inc()
    protocol.send_ack(turn.turn_id, written.version)


async def _bye(ctx: ClientContext, live: LiveSession) -> None:
    sid = live.session.session_id
    try:
        await ctx.call("end", lambda: ctx.store.end(live.caller, sid, ctx.clock()))
    except StoreError:
        live.protocol.fail("store_unavailable", "bye not saved: store unavailable; reconnect")
        return
    live.ended = True
    live.protocol.close(BYE)
    log.info("session end session=%s", sid)


async def _keep_fresh(ctx: ClientContext, live: LiveSession) -> None:
    """Renew a connected session's TTL and age, so a quiet call neither expires nor goes stale.

    Jitter keeps sessions that started together (after a reconnect storm) from
    renewing together.
    """
    while True:
        await asyncio.sleep(ctx.touch_interval * (0.5 + random.random() / 2))
        try:
            await _touch(ctx, live, "renewal")
        except Exception:
            # Renewal must outlive surprises: an expired session mid-call is worse than a log line.
            log.exception("renewal failed session=%s", live.session.session_id)


async def _touch(ctx: ClientContext, live: LiveSession, why: str) -> None:
    """Restart the session's TTL and age in the store; a failure is logged, not raised."""
    sid = live.session.session_id
    try:
        await ctx.call("touch", lambda: ctx.store.touch(live.caller, sid, ctx.clock()))
    except StoreError as exc:
        log.warning("%s failed session=%s error=%s", why, sid, exc)


async def _release(ctx: ClientContext, live: LiveSession) -> None:
    sid = live.session.session_id
    if live.keeper is not None:
        live.keeper.cancel()
    if ctx.live.get(sid) is live:
        del ctx.live[sid]
    ctx.metrics.sessions_active.dec()
    if not live.ended:
        # Best effort: a crash skips this, and the age then counts from the last renewal.
        await _touch(ctx, live, "touch on disconnect")
