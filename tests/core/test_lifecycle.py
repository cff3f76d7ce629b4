"""The live session's lifecycle: every transition, and the races review found, replayed.

Each race below was once a bug in the transport, found by review and fixed there with a
test that needed real sockets and timing. Here each is the sequence of events that made
it, with no event loop: what the lifecycle decides at each step is what the transport
does.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from gateway.core import codec
from gateway.core.agent import AgentMessage, InvalidAgentFrame, StatePatch
from gateway.core.closecodes import ErrorCode
from gateway.core.events import Turn
from gateway.core.lifecycle import (
    TOKEN_REQUIRED,
    Abandoned,
    Attached,
    Duplicate,
    Ignore,
    Lifecycle,
    Nack,
    Phase,
    Refusal,
    Write,
)
from gateway.core.resume import Outcome, Replay
from gateway.core.session import ResumeToken, Session, SessionId, empty_state

MAX = 1 << 20


@dataclass(frozen=True)
class Restored:
    """What a store's restore returns (as gateway.store.base.Restored)."""

    outcome: Outcome
    session: Session | None
    replay: Replay = Replay(1, partial=False)
    messages: tuple[bytes, ...] = ()
    replayed: bool = False


def session(sid: str = "s1", *, epoch: int = 1, version: int = 0, seq: int = 0) -> Session:
    return Session(
        SessionId(sid), ResumeToken("t"), version, empty_state(), 1, 1, seq=seq, epoch=epoch
    )


def attached(
    life: Lifecycle[str], client: str, restored: Restored, *, last_seq: int | None = None
) -> Attached[str]:
    decision = life.attach(client, restored, open=True, last_seq=last_seq, token=None, fenced={})
    assert isinstance(decision, Attached)
    return decision


def opened(client: str = "c1", **kwargs: int) -> Lifecycle[str]:
    life: Lifecycle[str] = Lifecycle()
    attached(life, client, Restored(Outcome.HIT, session(**kwargs)))
    return life


def turn(turn_id: str = "t1", **form: str) -> Turn:
    return Turn(turn_id, "hi", form or {"name": "Ada"}, None)


def written(life: Lifecycle[str], client: str, t: Turn) -> int:
    """Plan ``t`` and report it stored, as the transport does; the version it made."""
    plan = life.plan_turn(client, t, now_ms=5, max_state_size=MAX)
    assert isinstance(plan, Write)
    assert life.turn_written(plan.write, applied=True)
    life.acked(t)
    return plan.write.version


# Attaching


def test_first_restore_attaches_a_fresh_session() -> None:
    """A miss attaches a new session: counted, welcomed as new, the agent told to start."""
    life: Lifecycle[str] = Lifecycle()
    assert life.phase is Phase.OPENING and not life.gone
    decision = attached(life, "c1", Restored(Outcome.MISS, session()))
    assert life.phase is Phase.ATTACHED and life.client == "c1"
    assert decision.counted and decision.fresh and not decision.welcome.resumed
    assert (decision.previous, decision.replaced, decision.displaced) == (None, False, None)
    assert (decision.welcome.replay_from, decision.missed, decision.welcome.stale) == (
        None,
        0,
        False,
    )


def test_a_stale_session_is_flagged_and_not_fresh_once_written() -> None:
    """A stale restore is flagged; a restored session with turns resumes the agent."""
    life: Lifecycle[str] = Lifecycle()
    decision = attached(life, "c1", Restored(Outcome.STALE, session(version=3)))
    assert decision.welcome.stale and not decision.fresh and not decision.welcome.resumed


@pytest.mark.parametrize(
    ("restored", "token", "code", "replayed"),
    [
        (Restored(Outcome.REFUSED, None, replayed=True), "x", "resume_refused", True),
        (Restored(Outcome.REFUSED, None), TOKEN_REQUIRED, "resume_refused", False),
        (Restored(Outcome.REFUSED, None), "x", "resume_refused", False),
        (Restored(Outcome.ENDED, None), None, "session_ended", False),
    ],
)
def test_refusals_change_nothing(
    restored: Restored, token: str | None, code: str, replayed: bool
) -> None:
    """A refused restore fails the new client and leaves the session as it was."""
    life = opened()
    decision = life.attach("c2", restored, open=True, last_seq=None, token=token, fenced={})
    assert isinstance(decision, Refusal)
    assert (decision.code, decision.replayed) == (code, replayed)
    assert life.client == "c1" and life.phase is Phase.ATTACHED


def test_token_required_refusal_says_why() -> None:
    """A grant that needs the resume token is told so, not that its token was wrong."""
    life: Lifecycle[str] = Lifecycle()
    decision = life.attach(
        "c1",
        Restored(Outcome.REFUSED, None),
        open=True,
        last_seq=None,
        token=TOKEN_REQUIRED,
        fenced={},
    )
    assert isinstance(decision, Refusal)
    assert "needs its resume token" in decision.message


def test_a_newer_client_replaces_the_attached_one() -> None:
    """A second hello for the session displaces the first client, which is not counted twice."""
    life = opened("c1")
    decision = attached(life, "c2", Restored(Outcome.HIT, session(epoch=2)))
    assert decision.displaced == "c1" and not decision.counted and decision.welcome.resumed
    assert life.client == "c2"


def test_the_same_client_is_neither_displaced_nor_counted() -> None:
    """A degraded session restored for its own client: no takeover, no second count."""
    life: Lifecycle[str] = Lifecycle()
    life.open_degraded("c1", session("candidate"))
    assert life.phase is Phase.DEGRADED and life.recovering("c1")
    assert not life.recovering("c2")
    decision = attached(life, "c1", Restored(Outcome.MISS, session("real")))
    assert decision.recovered and decision.replaced and decision.previous == "candidate"
    assert decision.displaced is None and not decision.counted


def test_partial_replay_counts_what_the_client_missed() -> None:
    """A resume past the replay window says where the replay starts and what was missed."""
    life: Lifecycle[str] = Lifecycle()
    restored = Restored(Outcome.HIT, session(seq=200), Replay(73, partial=True))
    decision = attached(life, "c1", restored, last_seq=40)
    assert (decision.welcome.replay_from, decision.missed) == (73, 32)
    # A client that saw more than the store knows of missed nothing it can be told of.
    life = Lifecycle()
    restored = Restored(Outcome.HIT, session(seq=5), Replay(6, partial=True))
    assert attached(life, "c1", restored, last_seq=9).missed == 0
    # A new session's partial replay is nobody's loss.
    life = Lifecycle()
    restored = Restored(Outcome.MISS, session(), Replay(1, partial=True))
    assert attached(life, "c1", restored, last_seq=5).missed == 0


def test_a_hello_last_seq_acks_only_what_was_written() -> None:
    """Race: a hello's last_seq counted as an ack beyond the stored seq, so the next push
    let the store drop messages the client never had."""
    life: Lifecycle[str] = Lifecycle()
    attached(life, "c1", Restored(Outcome.HIT, session(seq=3)), last_seq=10)
    assert life.acked_seq == 3
    life.ack("c1", 50)
    assert life.acked_seq == 3
    life.ack("c2", 1)  # not its client: ignored
    assert life.acked_seq == 3


def test_a_new_session_forgets_the_old_ones_acks() -> None:
    """Acks of a replaced session do not carry over; a miss starts from none."""
    life = opened(seq=5)
    life.ack("c1", 5)
    attached(life, "c2", Restored(Outcome.HIT, session("s2", seq=9)), last_seq=None)
    assert life.acked_seq == 0
    attached(life, "c3", Restored(Outcome.MISS, session("s3", seq=0)), last_seq=4)
    assert life.acked_seq == 0


def test_a_takeover_heard_first_fences_the_restore() -> None:
    """Race: another instance restored the session after us and said so before our
    reply came: our restore must lose, or two instances would serve it."""
    life: Lifecycle[str] = Lifecycle()
    fenced = {SessionId("s1"): 3}
    decision = life.attach(
        "c1",
        Restored(Outcome.HIT, session(epoch=2)),
        open=True,
        last_seq=None,
        token=None,
        fenced=fenced,
    )
    assert isinstance(decision, Refusal) and decision.code == "session_replaced"
    assert life.phase is Phase.OPENING


def test_an_abandoned_hello_hands_its_epoch_to_the_held_client() -> None:
    """Race: a hello whose client left mid-restore bumped the epoch; the client still held
    here adopts it, or its next write would be refused."""
    life = opened(epoch=1, version=2, seq=1)
    restored = Restored(Outcome.HIT, session(epoch=2, version=2, seq=1))
    decision = life.attach("gone", restored, open=False, last_seq=None, token=None, fenced={})
    assert decision == Abandoned(adopted=True)
    assert life.session is not None and life.session.epoch == 2 and life.client == "c1"


def test_an_abandoned_hello_after_another_leaves_the_held_client_fenced() -> None:
    """Race: when another hello came between (the epoch moved by two), the held client is
    superseded and must stay fenced."""
    life = opened(epoch=1)
    restored = Restored(Outcome.HIT, session(epoch=3))
    decision = life.attach("gone", restored, open=False, last_seq=None, token=None, fenced={})
    assert decision == Abandoned(adopted=False)
    assert life.session is not None and life.session.epoch == 1
    # Nothing held, nothing to adopt.
    empty: Lifecycle[str] = Lifecycle()
    decision = empty.attach("gone", restored, open=False, last_seq=None, token=None, fenced={})
    assert decision == Abandoned(adopted=False)


# Turns


def test_a_turn_is_planned_written_and_acknowledged_once() -> None:
    """A new turn is written; the same turn again is a duplicate with its version."""
    life = opened()
    assert written(life, "c1", turn("t1")) == 1
    assert life.plan_turn("c1", turn("t1"), now_ms=6, max_state_size=MAX) == Duplicate(1)


def test_a_turn_from_a_replaced_client_is_ignored() -> None:
    """Race: a turn read before its connection was replaced must not be written."""
    life = opened("c1")
    attached(life, "c2", Restored(Outcome.HIT, session(epoch=2)))
    assert life.plan_turn("c1", turn(), now_ms=5, max_state_size=MAX) == Ignore()
    assert Lifecycle[str]().plan_turn("c1", turn(), now_ms=5, max_state_size=MAX) == Ignore()


def test_a_turn_past_the_state_limit_is_refused_before_it_is_applied() -> None:
    """The size is checked on the write, before the store or the session sees it."""
    life = opened()
    plan = life.plan_turn("c1", turn(name="x" * 500), now_ms=5, max_state_size=200)
    assert plan == Refusal(
        ErrorCode.STATE_TOO_BIG, "the turn would grow the session state past 200 bytes"
    )
    assert life.session is not None and life.session.version == 0


def test_an_unsure_write_is_retried_unchanged() -> None:
    """Race: a turn whose write failed mid-way is re-sent; it must retry that very write
    (same write ID), so the store can tell if the first try landed."""
    life = opened()
    first = life.plan_turn("c1", turn("t1"), now_ms=5, max_state_size=MAX)
    assert isinstance(first, Write)
    life.turn_unsure(first.write)
    again = life.plan_turn("c1", turn("t1"), now_ms=9, max_state_size=MAX)
    assert again == first
    # Only once: a third try after it was planned applies afresh.
    third = life.plan_turn("c1", turn("t1"), now_ms=9, max_state_size=MAX)
    assert isinstance(third, Write) and third.write.write_id != first.write.write_id


@pytest.mark.parametrize("change", ["turn", "version", "epoch"])
def test_an_unsure_write_of_another_turn_or_session_is_not_reused(change: str) -> None:
    """An unsure write is reused only for the same turn, version and epoch."""
    life = opened()
    first = life.plan_turn("c1", turn("t1"), now_ms=5, max_state_size=MAX)
    assert isinstance(first, Write)
    life.turn_unsure(first.write)
    assert life.session is not None
    turn_id = "t1"
    if change == "turn":
        turn_id = "t2"
    elif change == "version":
        life.session.version += 1
    else:
        life.session.epoch += 1
    plan = life.plan_turn("c1", turn(turn_id), now_ms=9, max_state_size=MAX)
    assert isinstance(plan, Write) and plan.write.write_id != first.write.write_id


def test_a_resume_forgets_an_unsure_write_of_the_session_it_replaces() -> None:
    """An unsure write belongs to the session it was planned for."""
    life = opened()
    plan = life.plan_turn("c1", turn("t1"), now_ms=5, max_state_size=MAX)
    assert isinstance(plan, Write)
    life.turn_unsure(plan.write)
    attached(life, "c2", Restored(Outcome.HIT, session(epoch=2)))
    assert life.unsure is None


def test_a_turn_applied_by_another_connection_is_not_committed() -> None:
    """Race: the store says another connection applied this turn ID first: ack it, but
    neither commit our copy nor tell the agent."""
    life = opened()
    plan = life.plan_turn("c1", turn("t1"), now_ms=5, max_state_size=MAX)
    assert isinstance(plan, Write)
    assert not life.turn_written(plan.write, applied=False)
    assert life.session is not None and life.session.version == 0


def test_turns_after_a_nack_wait_for_it() -> None:
    """Race: a turn sent after a nacked one must not land before it; once the nacked turn
    is acked, the rest go on."""
    life = opened()
    t1, t2 = turn("t1"), turn("t2")
    assert life.held_back("c1", t1) is None
    life.nacked("c1", t1)
    life.nacked("c1", t2)  # the first nack holds
    assert life.held_back("c1", t2) == Nack("an earlier turn is not stored yet: send 't1' first")
    assert life.held_back("c1", t1) is None  # the held turn itself goes
    assert life.held_back("other", t2) is None  # not its client
    life.acked(t2)
    assert life.held == "t1"
    written(life, "c1", t1)
    assert life.held is None and life.held_back("c1", t2) is None


def test_a_new_client_does_not_inherit_a_held_turn() -> None:
    """The held turn is the connection's: a resume on a new one starts clear."""
    life = opened()
    life.nacked("c1", turn("t1"))
    life.nacked("c2", turn("t9"))  # not its client: ignored
    assert life.held == "t1"
    attached(life, "c2", Restored(Outcome.HIT, session(epoch=2)))
    assert life.held is None


# Agent output


def test_check_sorts_and_refuses_in_order() -> None:
    """Patches are checked against the state the earlier ones leave; errors keep order."""
    life = opened()
    bad = InvalidAgentFrame("invalid_patch", "no")
    frames = [
        AgentMessage(b'{"a":1}'),
        StatePatch({"form_answers": {"name": "Ada"}}),
        bad,
        StatePatch({"context": {"big": "x" * 300}}),
    ]
    limit = len(codec.dumps({**empty_state(), "form_answers": {"name": "Ada"}})) + 10
    batch = life.check(frames, limit)
    assert batch.size == 4
    assert batch.messages == [b'{"a":1}']
    assert batch.patches == [{"form_answers": {"name": "Ada"}}]
    assert [e.code for e in batch.rejected] == ["invalid_patch", "state_too_big"]


def test_a_push_is_planned_once_and_retried_unchanged() -> None:
    """Race: a push retried after a store failure is the same push (its ID tells the store
    that a try landed); nothing to write, nothing planned."""
    life = opened()
    batch = life.check([AgentMessage(b"1")], MAX)
    push = life.plan_push(batch, now_ms=5)
    assert push is not None and life.plan_push(batch, now_ms=6) is push
    assert life.plan_push(life.check([], MAX), now_ms=5) is None


def test_a_resume_mid_push_rebases_or_recognises_it() -> None:
    """Race: a resume re-based the session while a push waited for the store. If the
    restore shows it landed, it is not written again; if not, it is re-planned on top of
    what was restored, so nothing is lost or written twice."""
    life = opened(seq=2)
    batch = life.check([AgentMessage(b"1")], MAX)
    push = life.plan_push(batch, now_ms=5)
    assert push is not None
    landed = session(epoch=2, seq=3)
    landed.last_push = push.push_id
    attached(life, "c2", Restored(Outcome.HIT, landed))
    assert life.plan_push(batch, now_ms=6) is None

    life = opened(seq=2)
    batch = life.check([AgentMessage(b"1")], MAX)
    push = life.plan_push(batch, now_ms=5)
    assert push is not None
    attached(life, "c2", Restored(Outcome.HIT, session(epoch=2, seq=4)))
    again = life.plan_push(batch, now_ms=6)
    assert again is not None and again.push_id != push.push_id
    assert (again.base_seq, again.epoch) == (4, 2)


def test_pushed_delivers_only_what_the_client_was_not_sent() -> None:
    """Messages already sent (a replay raced the push) are not sent twice."""
    life = opened()
    life.ack("c1", 0)
    push = life.plan_push(life.check([AgentMessage(b"1"), AgentMessage(b"2")], MAX), now_ms=5)
    assert push is not None
    assert life.pushed(push, sent_seq=1) == [(2, b"2")]
    assert life.session is not None and life.session.seq == 2


# Closing


def test_bye_ends_the_session_for_good() -> None:
    """Only the attached client may end it; then it is over, and a drop keeps it ended."""
    life = opened()
    assert life.end("c2") is None
    assert life.end("c1") is life.session
    life.ended()
    assert life.phase is Phase.ENDED and life.gone and life.client is None
    assert life.drop() is None and life.phase is Phase.ENDED


def test_a_dropped_client_lingers_for_its_agent_then_is_released() -> None:
    """Without bye, a session with an agent lingers; the linger's end releases it."""
    life = opened()
    assert life.detach("other", linger=True) is None
    assert life.detach("c1", linger=True) is True
    assert life.phase is Phase.LINGERING and life.linger_over()
    assert life.detach("c1", linger=True) is None  # said once
    assert life.drop() is None
    assert life.phase is Phase.RELEASED and not life.linger_over()


def test_a_dropped_client_without_an_agent_is_released_at_once() -> None:
    """Nothing to wait for: the transport releases it straight away."""
    life = opened()
    assert life.detach("c1", linger=False) is False
    assert life.phase is Phase.ATTACHED and life.linger_over()


def test_a_client_back_in_time_ends_the_linger() -> None:
    """Race: the linger timer fired while a hello was restoring the session: the dropped
    session must not be released under the hello that adopts it."""
    life = opened()
    life.detach("c1", linger=True)
    attached(life, "c2", Restored(Outcome.HIT, session(epoch=2)))
    assert life.phase is Phase.ATTACHED and not life.linger_over()


def test_a_takeover_supersedes_only_an_older_epoch_of_the_same_session() -> None:
    """Race: a takeover notice that arrives after this process restored the session again
    must not drop it; one for another session, or once gone, changes nothing."""
    life = opened(epoch=2)
    assert not life.superseded(SessionId("s1"), 2)
    assert not life.superseded(SessionId("other"), 9)
    assert life.superseded(SessionId("s1"), 3)
    assert not Lifecycle[str]().superseded(SessionId("s1"), 3)
    assert life.drop() == "c1"
    assert not life.superseded(SessionId("s1"), 3)


def test_a_drain_flushes_then_releases() -> None:
    """A drain marks the session, and the drop that follows releases it."""
    life = opened()
    life.drain()
    assert life.phase is Phase.DRAINING and not life.gone
    assert life.drop() == "c1" and life.phase is Phase.RELEASED
    life.drain()
    assert life.phase is Phase.RELEASED


def test_a_drop_mid_degraded_recovery_stops_it() -> None:
    """Race: a degraded session dropped (replaced, drained) while its recovery waits on the
    store: the recovery must not attach anything after."""
    life: Lifecycle[str] = Lifecycle()
    life.open_degraded("c1", replace(session(), session_id=SessionId("cand")))
    life.drop()
    assert not life.recovering("c1")
