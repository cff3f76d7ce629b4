"""The life of a live session in one gateway process, without I/O.

Theory of operation
-------------------

One :class:`Lifecycle` per caller key served by a process. The transport
(:mod:`gateway.transport.sessions`) holds it beside what only I/O can hold (the
lock, the agent link, timers and tasks) and asks it what to do at every step:
a restore came back, a turn arrived, the agent's output is ready to write, the
client dropped, a takeover was heard of. Each transition is a method that
changes the lifecycle and returns the decision, for the transport to carry out
(send a welcome, refuse, fail the displaced client, write, nack). Nothing here
awaits, so a race between two steps is a sequence of calls that a loop-free
test can replay (``tests/core/test_lifecycle.py``).

The transport calls the transitions that follow a store call (``attach``,
``plan_turn`` and what follows it, ``check``/``plan_push``/``pushed``, ``end``,
``superseded``, the linger's and drain's ``drop``) under the session's lock. The
others run without it, between two awaits: ``held_back``, ``nacked`` and ``ack``
(the connection's own turn order and acks), ``detach`` (the handler's exit),
``drain`` and the linger timer's first ``linger_over``. None of them awaits, and
each leaves nothing that a locked step, once it holds the lock, does not check again.

Phases and transitions::

    OPENING --attach------------> ATTACHED      the first restore
    OPENING --open_degraded-----> DEGRADED      the store did not answer in time
    DEGRADED --attach-----------> ATTACHED      the real restore (or another hello's)
    ATTACHED --attach-----------> ATTACHED      a newer client: the old one is replaced
    ATTACHED, DEGRADED --detach-> LINGERING     dropped without bye, an agent to listen to
                       --detach-> RELEASED      dropped without bye, nothing to wait for
    LINGERING --attach----------> ATTACHED      the client came back in time
    LINGERING --linger_over-----> RELEASED
    ATTACHED --end--------------> ENDED         bye was stored
    any live --drain------------> DRAINING      agent output flushed, then 1012
    any --drop------------------> RELEASED      moved elsewhere, drained, failed

A refused or abandoned restore leaves the phase as it was. ENDED and RELEASED
are final: the process no longer serves the session, and a later hello makes a
new :class:`Lifecycle` from what the store holds.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

from gateway.core import codec
from gateway.core.agent import AgentErrorCode, AgentMessage, InvalidAgentFrame, StatePatch
from gateway.core.closecodes import ErrorCode
from gateway.core.events import Turn
from gateway.core.resume import Outcome, Replay
from gateway.core.session import Push, Session, SessionId, TurnWrite, merge_patch
from gateway.core.wire import Welcome

__all__ = [
    "TOKEN_REQUIRED",
    "Abandoned",
    "Attached",
    "Batch",
    "Duplicate",
    "Ignore",
    "Lifecycle",
    "Nack",
    "Phase",
    "Refusal",
    "Restore",
    "TurnPlan",
    "Write",
]

C = TypeVar("C")
"""The transport's client connection: only its identity matters here."""

TOKEN_REQUIRED = "\x00required"
"""Stands for a missing resume token that the grant requires: it matches no session's, so
an existing session with turns is refused rather than resumed."""


class Phase(enum.Enum):
    """Where a live session stands in this process."""

    OPENING = "opening"
    """Its first restore is under way: no session yet."""
    DEGRADED = "degraded"
    """Opened without the store: new, held here only, its real restore still trying."""
    ATTACHED = "attached"
    """Restored, with a client connection."""
    LINGERING = "lingering"
    """The client dropped without bye; the agent link stays and its output is stored."""
    DRAINING = "draining"
    """This process is shutting down: the agent's output is being flushed."""
    ENDED = "ended"
    """The client said bye and the store has it."""
    RELEASED = "released"
    """No longer served here: lingered out, drained, moved elsewhere or failed."""


_FINAL = frozenset({Phase.ENDED, Phase.RELEASED})


class Restore(Protocol):
    """What a store's restore found (:class:`gateway.store.base.Restored` is one)."""

    @property
    def outcome(self) -> Outcome: ...
    @property
    def session(self) -> Session | None: ...
    @property
    def replay(self) -> Replay: ...
    @property
    def messages(self) -> Sequence[bytes]: ...
    @property
    def replayed(self) -> bool: ...


# What an attach decides.


@dataclass(frozen=True, slots=True)
class Refusal:
    """Refused for good (a hello the restore refused, a turn past the state limit): fail
    the client with ``code``."""

    code: ErrorCode
    message: str
    replayed: bool = False
    """It presented a resume token already traded for a newer one (a copy in other hands)."""


@dataclass(frozen=True, slots=True)
class Abandoned:
    """The client left while its restore was under way: nothing is attached."""

    adopted: bool
    """The restore's new epoch was adopted by the client held here (no other hello came
    between), so that its next write is not refused."""


@dataclass(frozen=True, slots=True)
class Attached(Generic[C]):
    """The restored session is the client's now: welcome it, replay, start the agent."""

    session: Session
    previous: SessionId | None
    """The session held here before, if any (its by-ID entry goes)."""
    replaced: bool
    """What was held here was another session: its agent link, tasks and unread agent
    output belong to it, and go."""
    displaced: C | None
    """The client this one replaces here: fail it with ``session_replaced``."""
    counted: bool
    """A session that had no client: one more active."""
    recovered: bool
    """A degraded session restored: its waiting turns go on, its recovery stops."""
    welcome: Welcome
    missed: int
    """Messages the resuming client will never see: the replay window moved past them."""
    fresh: bool
    """A new session the agent has not heard of: ``session.start``, not ``session.resume``."""


# What a turn plan decides.


@dataclass(frozen=True, slots=True)
class Ignore:
    """The connection no longer holds the session (it was told, and is closing)."""


@dataclass(frozen=True, slots=True)
class Nack:
    """Not stored: the client sends it again later, staying connected."""

    why: str


@dataclass(frozen=True, slots=True)
class Duplicate:
    """Already applied: acknowledge it with the version it produced."""

    version: int


@dataclass(frozen=True, slots=True)
class Write:
    """Write this to the store, then report with :meth:`Lifecycle.turn_written`."""

    write: TurnWrite


TurnPlan = Ignore | Duplicate | Refusal | Write


@dataclass(slots=True)
class Batch:
    """Agent output checked and ready to write: ``size`` frames of the relay's queue."""

    size: int
    patches: list[dict[str, Any]] = field(default_factory=list)
    messages: list[bytes] = field(default_factory=list)
    rejected: list[InvalidAgentFrame] = field(default_factory=list)
    """Frames refused, in order (to be reported to the agent)."""
    push: Push | None = None
    """The write last tried; retried unchanged while the session's epoch holds."""


_REFUSALS: Mapping[Outcome, tuple[ErrorCode, str]] = {
    Outcome.REFUSED: (ErrorCode.RESUME_REFUSED, "the resume token does not match this session"),
    Outcome.ENDED: (
        ErrorCode.SESSION_ENDED,
        "this call ended with bye; a new call needs a new call_id",
    ),
}


class Lifecycle(Generic[C]):
    """One caller's session as this process serves it (see the module docstring)."""

    # Ten thousand idle sessions hold ten thousand of these: no __dict__ each.
    __slots__ = ("acked_seq", "client", "held", "phase", "session", "unsure")

    def __init__(self) -> None:
        self.phase = Phase.OPENING
        self.session: Session | None = None
        """``None`` until the first restore completes."""
        self.client: C | None = None
        self.acked_seq = 0
        """The newest message the client acknowledged; older ones may leave the store."""
        self.unsure: TurnWrite | None = None
        """A turn write whose outcome is unknown (the store failed mid-write and the client
        was told to re-send): the re-sent turn retries this very write, so that the store
        can tell whether it landed."""
        self.held: str | None = None
        """The ID of the client's nacked turn not yet acked: until it is, its later turns
        are nacked too, so that turns are applied in the order they were sent."""

    @property
    def gone(self) -> bool:
        """Whether this process serves the session no more."""
        return self.phase in _FINAL

    # Opening

    def attach(
        self,
        client: C,
        restored: Restore,
        *,
        open: bool,
        last_seq: int | None,
        token: str | None,
        fenced: Mapping[SessionId, int],
    ) -> Refusal | Abandoned | Attached[C]:
        """Make what the store restored the session of ``client``.

        Args:
            open: Whether the client is still connected.
            last_seq: The newest message the hello says the client has.
            token: The resume token the hello was restored with.
            fenced: Takeovers heard of for sessions not served here: ID to epoch.
        """
        outcome, session = restored.outcome, restored.session
        if session is None:
            if restored.replayed:
                return Refusal(
                    ErrorCode.RESUME_REFUSED, "this resume token was replaced by a newer one", True
                )
            if outcome is Outcome.REFUSED and token == TOKEN_REQUIRED:
                return Refusal(
                    ErrorCode.RESUME_REFUSED,
                    "this call's session exists: resuming it needs its resume token",
                )
            return Refusal(*_REFUSALS[outcome])
        if not open:
            # The client gave up on this hello (a slow restore) and has likely reconnected;
            # taking the session over now would close its live connection. The restore did
            # start a new epoch; a client here holding the session adopts it, or its next
            # write would be refused, but only when no other hello came between
            # (anywhere): else the held client is superseded, and must stay fenced.
            held = self.session
            adopted = (
                held is not None
                and self.client is not None
                and (held.session_id, held.epoch + 1, held.version, held.seq)
                == (session.session_id, session.epoch, session.version, session.seq)
            )
            if adopted:
                assert held is not None
                held.epoch = session.epoch
            return Abandoned(adopted)
        if fenced.get(session.session_id, 0) > session.epoch:
            # Another instance restored it after us, and said so before our reply came.
            return Refusal(
                ErrorCode.SESSION_REPLACED, "another connection resumed this session first"
            )
        previous = self.session
        replaced = previous is not None and previous.session_id != session.session_id
        if replaced:
            self.acked_seq = 0  # the client acks of another session
        old = self.client
        recovered = self.phase is Phase.DEGRADED
        self.phase = Phase.ATTACHED
        self.session = session
        self.client = client
        self.unsure = None  # a write of the session this one replaces
        if old is not client:
            self.held = None
        hit = outcome is Outcome.HIT
        if not hit:
            self.acked_seq = 0
        else:
            # What the client says it has: an ack, but never of messages not yet written.
            self.acked_seq = min(max(self.acked_seq, last_seq or 0), session.seq)
        replay = restored.replay
        missed = 0
        if replay.partial and hit:
            missed = max(0, replay.start - (last_seq or 0) - 1)
        return Attached(
            session=session,
            previous=None if previous is None else previous.session_id,
            replaced=replaced,
            displaced=old if old is not None and old is not client else None,
            counted=old is None,
            recovered=recovered,
            welcome=Welcome(
                session,
                resumed=hit,
                stale=outcome is Outcome.STALE,
                replay_from=replay.start if replay.partial else None,
            ),
            missed=missed,
            fresh=not hit and session.version == 0,
        )

    def open_degraded(self, client: C, candidate: Session) -> None:
        """Open the session without the store: ``candidate``, held here only."""
        self.phase = Phase.DEGRADED
        self.session = candidate
        self.client = client

    def recovering(self, client: C) -> bool:
        """Whether a degraded session's real restore for ``client`` is still wanted."""
        return not self.gone and self.client is client

    # Turns

    def held_back(self, client: C, turn: Turn) -> Nack | None:
        """Nack a turn sent after one still unstored, before it waits for anything."""
        held = self.held
        if held is not None and held != turn.turn_id and client is self.client:
            return Nack(f"an earlier turn is not stored yet: send {held!r} first")
        return None

    def plan_turn(self, client: C, turn: Turn, *, now_ms: int, max_state_size: int) -> TurnPlan:
        """Decide what to do with ``turn``: the one place that knows if it was applied."""
        session = self.session
        if self.client is not client or session is None:
            return Ignore()
        applied = session.applied_version(turn.turn_id)
        if applied is not None:
            return Duplicate(applied)
        unsure = self.unsure
        self.unsure = None
        if (
            unsure is not None
            and unsure.turn_id == turn.turn_id
            and unsure.base_version == session.version
            and unsure.epoch == session.epoch
        ):
            write = unsure  # the very write that may have landed: the store can tell
        else:
            write = session.apply(turn, now_ms)
        if len(write.encoded) > max_state_size:
            # Not retryable: the same turn would be refused again; the session is intact.
            return Refusal(
                ErrorCode.STATE_TOO_BIG,
                f"the turn would grow the session state past {max_state_size} bytes",
            )
        return Write(write)

    def turn_written(self, write: TurnWrite, *, applied: bool) -> bool:
        """The store took ``write``; ``applied`` is ``False`` when another connection had
        applied this turn ID first (our copy is now behind, and the next write is refused
        as a conflict). Returns whether the turn goes to the agent."""
        if applied:
            assert self.session is not None
            self.session.commit(write)
        return applied

    def turn_unsure(self, write: TurnWrite) -> None:
        """The store failed mid-write: the re-sent turn retries this very write."""
        self.unsure = write

    def nacked(self, client: C, turn: Turn) -> None:
        """``turn`` was nacked: the client's later turns wait for it."""
        if self.held is None and client is self.client:
            self.held = turn.turn_id

    def acked(self, turn: Turn) -> None:
        """``turn`` was acked: the turns after it may go on."""
        if self.held == turn.turn_id:
            self.held = None

    def ack(self, client: C, seq: int) -> None:
        """The client has the messages up to ``seq`` (never past what is written)."""
        if self.client is client and self.session is not None:
            self.acked_seq = max(self.acked_seq, min(seq, self.session.seq))

    # Agent output

    def check(
        self,
        frames: Sequence[AgentMessage | StatePatch | InvalidAgentFrame],
        max_state_size: int,
    ) -> Batch:
        """Sort the agent's parsed frames into a batch; refuse patches that would grow the
        state past ``max_state_size`` (each checked against the patches before it).

        A frame that did not parse stands in the sequence as its error, so that the agent
        hears of every refusal in the order it sent the frames.
        """
        assert self.session is not None
        batch = Batch(len(frames))
        state = self.session.state
        for frame in frames:
            if isinstance(frame, InvalidAgentFrame):
                batch.rejected.append(frame)
                continue
            if isinstance(frame, AgentMessage):
                batch.messages.append(frame.data)
                continue
            trial = merge_patch(state, frame.patch)
            if len(codec.dumps(trial)) > max_state_size:
                batch.rejected.append(
                    InvalidAgentFrame(
                        AgentErrorCode.STATE_TOO_BIG,
                        f"the patch would grow the state past {max_state_size}",
                    )
                )
                continue
            state = trial
            batch.patches.append(frame.patch)
        return batch

    def plan_push(self, batch: Batch, *, now_ms: int) -> Push | None:
        """The write for ``batch``, or ``None`` if there is nothing (left) to write.

        A write retried after a store failure is the same write, so that a try which
        landed is recognised by its push ID; if a resume re-based the session meanwhile,
        the restored session says whether it landed, and if not, the same frames are
        written again on top of what was restored.
        """
        session = self.session
        assert session is not None
        if not batch.patches and not batch.messages:
            return None
        push = batch.push
        if push is not None and push.epoch != session.epoch:
            if session.last_push == push.push_id:
                return None  # it had landed: the resume restored and replayed it
            push = None
        if push is None:
            push = batch.push = session.push(
                batch.patches, batch.messages, acked_seq=self.acked_seq, now_ms=now_ms
            )
        return push

    def pushed(self, push: Push, *, sent_seq: int) -> list[tuple[int, bytes]]:
        """Adopt ``push`` once durable; return the messages the client has not been sent."""
        assert self.session is not None
        self.session.commit_push(push)
        return [
            (push.base_seq + 1 + offset, data)
            for offset, data in enumerate(push.messages)
            if push.base_seq + 1 + offset > sent_seq
        ]

    # Closing

    def end(self, client: C) -> Session | None:
        """Whether ``client`` may end the session with bye: its session, if so."""
        return self.session if self.client is client else None

    def ended(self) -> None:
        """The store has the bye: the session is over."""
        self.phase = Phase.ENDED
        self.client = None

    def detach(self, client: C, *, linger: bool) -> bool | None:
        """``client`` went away without bye.

        Args:
            linger: Whether an agent link is there to listen to.

        Returns:
            ``None`` if it held the session no more; ``True`` if the session lingers,
            ``False`` if it is to be released at once.
        """
        if self.client is not client or self.gone:
            return None
        self.client = None
        if linger:
            self.phase = Phase.LINGERING
        return linger

    def linger_over(self) -> bool:
        """Whether the session is to be released: no client came back, and nothing
        released it meanwhile."""
        return self.client is None and not self.gone

    def superseded(self, session_id: SessionId, epoch: int) -> bool:
        """Whether a takeover of ``session_id`` at ``epoch`` (heard of, or found by a
        renewal) ends this process's hold of the session."""
        session = self.session
        if self.gone or session is None or session.session_id != session_id:
            return False
        return session.epoch < epoch  # else: restored here again since, ours is newest

    def drain(self) -> None:
        """This process is closing the session: the agent's output is being flushed."""
        if not self.gone:
            self.phase = Phase.DRAINING

    def drop(self) -> C | None:
        """Serve the session here no more; returns the client it had, if any."""
        if self.phase is not Phase.ENDED:
            self.phase = Phase.RELEASED
        client, self.client = self.client, None
        return client
