"""The agent side of one live session: take, check, persist, deliver.

A :class:`Relay` holds a session's :class:`~gateway.transport.downstream.AgentLink`,
the :class:`~gateway.transport.downstream.Inbox` where the agent's output waits, and
the pump that persists it and relays it to the client. Each frame the agent sends is
parsed once, as it arrives (:meth:`Relay.take`): a bad one is refused back to the
agent at once, a phone stream's audio, mark or clear goes straight to the caller, and
state patches and messages wait in the inbox. The pump takes them in batches, has the
:class:`~gateway.core.lifecycle.Lifecycle` check them against the state and plan the
write, writes it, and sends the client what it has not been sent.

The inbox and pump outlive a link (a drain stops the link, then the pump persists
what the agent had sent); a resume that finds another session held here replaces the
whole relay.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Literal

from gateway.core import agent
from gateway.core.closecodes import ErrorCode
from gateway.core.lifecycle import Batch
from gateway.exceptions import StoreConflict, StoreError
from gateway.transport.downstream import AgentLink, Inbox
from gateway.transport.sessions import log_failure

if TYPE_CHECKING:
    from gateway.transport.sessions import LiveSession

__all__ = ["Relay"]

log = logging.getLogger("gateway.client")

_BATCH = 64
"""Agent frames persisted in one store write at most."""

Output = agent.AgentMessage | agent.StatePatch | agent.InvalidAgentFrame
"""What waits in the inbox: the agent's frames that change the session, and the errors
of those that did not parse (reported in order, with the rest)."""


class Relay:
    """The agent link, inbox and pump of one live session (see the module docstring)."""

    __slots__ = ("inbox", "link", "live", "pump", "sessions", "unsaved")

    def __init__(self, live: LiveSession) -> None:
        self.live = live
        self.sessions = live.sessions
        self.link: AgentLink[Output] | None = None
        self.inbox: Inbox[Output] = Inbox(max_size=self.sessions.outbound.max_send_queue)
        self.pump: asyncio.Task[None] | None = None
        """Persists and relays what the agent sends."""
        self.unsaved = 0
        """Agent frames the pump took from the inbox and has not persisted yet."""

    def dial(self, *, fresh: bool) -> None:
        """Open a link to the agent, or tell the open one where the session stands.

        Args:
            fresh: A new session the agent has not heard of: ``session.start``.
        """
        if self.link is not None:
            self.link.reopen("client_resumed")
            return
        sessions, live = self.sessions, self.live
        assert sessions.downstream is not None and live.session is not None
        agent_config = sessions.config.agent
        self.link = AgentLink(
            sessions.downstream,
            opening=self._opening,
            reason="start" if fresh else "client_resumed",
            inbox=self.inbox,
            metrics=sessions.metrics,
            delays=sessions.agent_delays,
            max_size=sessions.limits.max_message_size,
            open_timeout=agent_config.agent_open_timeout,
            send_timeout=sessions.outbound.send_timeout,
            max_queue=sessions.outbound.max_send_queue,
            session_id=live.session.session_id,
            take=self.take,
            take_now=self.take_now,
        )

    def _opening(self, why: str) -> bytes:
        live = self.live
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

    def take(self, link: AgentLink[Output], frame: str | bytes) -> Output | None:
        """Parse one frame from ``link``: what the pump is to persist (or refuse), or
        ``None`` if it went straight to a phone caller."""
        sessions, live = self.sessions, self.live
        try:
            parsed = agent.parse_frame(
                frame, max_size=sessions.limits.max_message_size, phone=live.phone
            )
        except agent.InvalidAgentFrame as exc:
            return exc
        if not isinstance(parsed, agent.Media):
            return parsed
        self._relay_media(link, parsed)
        return None

    def take_now(self, link: AgentLink[Output], frame: str) -> bool:
        """Relay ``frame`` as it is read if it is a phone caller's audio; otherwise leave
        it to :meth:`take` (which parses it again: audio is what comes often)."""
        live = self.live
        if not live.phone:
            return False
        try:
            parsed = agent.parse_frame(
                frame, max_size=self.sessions.limits.max_message_size, phone=True
            )
        except agent.InvalidAgentFrame:
            return False
        if not isinstance(parsed, agent.Media):
            return False
        self._relay_media(link, parsed)
        return True

    def _relay_media(self, link: AgentLink[Output], parsed: agent.Media) -> None:
        sessions, live = self.sessions, self.live
        media = sessions.metrics.media_frames
        if self.link is not link or live.relay is not self:
            # A link being closed (its session replaced here): not for the current stream.
            media["to_caller", "dropped"].inc()
            return None
        conn = live.client
        sent = conn is not None and conn.protocol.send_media(parsed)
        if sent:
            assert conn is not None
            conn.flush()
        media["to_caller", "relayed" if sent else "dropped"].inc()

    def _refuse(self, link: AgentLink[Output] | None, exc: agent.InvalidAgentFrame) -> None:
        """Count and log a refused frame, and tell the agent why, if it is still there."""
        self.sessions.metrics.agent_errors.labels(exc.code).inc()
        session = self.live.session
        log.warning("agent frame rejected session=%s %s", session and session.session_id, exc)
        if link is not None:
            link.send(agent.error_frame(exc))

    def start(self) -> None:
        """Start the pump, unless it runs."""
        if self.pump is None:
            self.pump = asyncio.create_task(self._pump())
            self.pump.add_done_callback(log_failure)

    def close_link(self, final: bytes | None = None) -> None:
        """Stop the link (after ``final``), in the background."""
        if self.link is not None:
            # stop() takes effect at once: the link sends nothing more for this session.
            self.sessions.background(self.link.stop(final))
            self.link = None

    async def flush(self, timeout: float) -> None:
        """Stop the link and wait, for ``timeout`` at most, until the pump has persisted
        and relayed what the agent had sent."""
        link, self.link = self.link, None
        if link is not None:
            await link.stop()
        deadline = time.monotonic() + timeout
        while (self.unsaved or not self.inbox.empty()) and time.monotonic() < deadline:
            if self.live.gone:
                break
            await asyncio.sleep(0.02)

    async def _pump(self) -> None:
        """Persist what the agent sends, then relay it to the client; batch what queued up.

        A write that failed for want of a store is retried unchanged (see
        :meth:`~gateway.core.lifecycle.Lifecycle.plan_push`).
        """
        live, inbox = self.live, self.inbox
        room = self.sessions.outbound.max_send_queue // 4
        pending: list[tuple[Output, int]] = []
        batch: Batch | None = None
        delays: Iterator[float] | None = None
        while True:
            if batch is None and live.client is not None:
                # At the pace the client reads: the inbox fills meanwhile, and holds the agent.
                await live.client.room()
            if not pending:
                pending.append(await inbox.get())
            if batch is None:
                # Bounded in bytes too: a batch held through a store outage is memory the
                # inbox no longer counts, and one batch must fit in the client's queue.
                size = sum(taken for _, taken in pending)
                while len(pending) < _BATCH and size < room and not inbox.empty():
                    pending.append(inbox.get_nowait())
                    size += pending[-1][1]
            self.unsaved = len(pending)
            async with live.lock:
                if live.gone:
                    return
                if batch is None:
                    frames = [frame for frame, _ in pending]
                    batch = live.life.check(frames, self.sessions.limits.max_state_size)
                    for exc in batch.rejected:
                        self._refuse(self.link, exc)
                try:
                    done = await self._persist(batch)
                except Exception:
                    session = live.session
                    log.exception("relay failed session=%s", session and session.session_id)
                    done = "drop"
                    live.fail(ErrorCode.INTERNAL_ERROR, "unexpected error; reconnect")
                    live.drop()
            if done == "retry":
                # The store is down: keep the frames (the inbox fills and the link stops
                # reading, which holds the agent back) and try again.
                if delays is None:
                    delays = iter(self.sessions.delays())
                await asyncio.sleep(next(delays, 1.0))
                continue
            if done == "drop":
                return
            del pending[: batch.size]
            self.unsaved = len(pending)
            batch, delays = None, None

    async def _persist(self, batch: Batch) -> Literal["ok", "retry", "drop"]:
        sessions, live = self.sessions, self.live
        session = live.session
        assert session is not None
        push = live.life.plan_push(batch, now_ms=sessions.clock())
        if push is None:
            return "ok"
        try:
            await sessions.call(
                "push", lambda: sessions.store.push(live.caller, session.session_id, push)
            )
        except StoreConflict as exc:
            log.info("agent output refused session=%s reason=%s", session.session_id, exc.detail)
            live.fail(ErrorCode.SESSION_CONFLICT, f"{exc.detail}; reconnect to resume")
            live.drop()
            return "drop"
        except StoreError as exc:
            log.warning("agent output not written session=%s error=%s", session.session_id, exc)
            if exc.retryable:
                return "retry"
            # The same write would be refused again: give the session up here, and let the
            # client's resume start from what the store holds.
            live.fail(ErrorCode.STORE_UNAVAILABLE, "agent output not saved; reconnect")
            live.drop()
            return "drop"
        conn = live.client
        fresh = live.life.pushed(push, sent_seq=conn.sent_seq if conn is not None else 0)
        sessions.metrics.messages_stored.inc(len(push.messages))
        if conn is not None:
            if push.state is not None:
                conn.protocol.send_state(session)
            for seq, data in fresh:
                conn.protocol.send_msg(seq, data)
                conn.sent_seq = seq
                sessions.metrics.messages_relayed.inc()
            conn.flush()
        return "ok"
