"""Applying turns and the voice agent's pushes to session state."""

from __future__ import annotations

import copy

from gateway.core import codec
from gateway.core.events import Turn
from gateway.core.session import (
    RECENT_TURNS,
    Push,
    ResumeToken,
    Session,
    SessionId,
    empty_state,
    new_resume_token,
    new_session_id,
)


def fresh() -> Session:
    return Session(SessionId("s"), ResumeToken("t"), 0, empty_state(), 1, 1)


def test_apply_merges_and_bumps_without_mutating() -> None:
    """apply() merges form and context into a copy and bumps the version; commit adopts it."""
    session = fresh()
    session.commit(session.apply(Turn("t1", "hi", {"name": "Ada", "date": "mon"}, {"k": 1}), 5))
    write = session.apply(Turn("t2", None, {"date": "tue"}, None), 9)
    assert session.version == 1
    assert session.state["form_answers"] == {"name": "Ada", "date": "mon"}
    assert (write.base_version, write.version) == (1, 2)
    assert write.state["form_answers"] == {"name": "Ada", "date": "tue"}
    assert write.state["context"] == {"k": 1}
    assert write.state["last_turn"] == {"turn_id": "t2", "at_ms": 9, "form": {"date": "tue"}}
    session.commit(write)
    assert session.version == 2
    assert session.updated_ms == 9
    assert session.applied_version("t1") == 1
    assert session.applied_version("t2") == 2
    assert session.applied_version("t3") is None


def test_recent_turns_are_bounded() -> None:
    """Only the last RECENT_TURNS turn IDs are remembered, oldest dropped first."""
    session = fresh()
    for i in range(RECENT_TURNS + 5):
        session.commit(session.apply(Turn(f"t{i}", None, None, None), i))
    assert len(session.recent_turns) == RECENT_TURNS
    assert session.applied_version("t4") is None
    assert session.applied_version("t5") == 6


def test_ids_are_random() -> None:
    """Session IDs and resume tokens do not repeat."""
    assert len({new_session_id() for _ in range(100)}) == 100
    assert len({new_resume_token() for _ in range(100)}) == 100


def agent_session() -> Session:
    """A session at version 4 whose agent has already sent 6 messages, restored twice."""
    state = {
        "context": {"lang": "en", "step": 2},
        "form_answers": {"name": "Ada", "date": "mon"},
        "last_turn": {"turn_id": "t4", "at_ms": 3},
    }
    return Session(SessionId("s"), ResumeToken("t"), 4, state, 1, 3, seq=6, epoch=3)


def test_new_session_epoch_is_one() -> None:
    """A session built without an epoch is at epoch 1 and sequence number 0."""
    session = fresh()
    assert (session.epoch, session.seq) == (1, 0)


def test_apply_carries_epoch() -> None:
    """The TurnWrite from apply() carries the session's epoch for the store to check."""
    assert fresh().apply(Turn("t1", None, None, None), 5).epoch == 1
    assert agent_session().apply(Turn("t5", None, None, None), 5).epoch == 3


def test_push_numbers_messages_without_patch() -> None:
    """Messages alone follow the session's seq; state and version stay as they are."""
    session = agent_session()
    push = session.push([], [b'{"type":"a"}', b'{"type":"b"}'], acked_seq=4, now_ms=9)
    assert push == Push(
        epoch=3,
        base_version=4,
        version=4,
        state=None,
        encoded=None,
        base_seq=6,
        messages=(b'{"type":"a"}', b'{"type":"b"}'),
        acked_seq=4,
        at_ms=9,
        push_id=push.push_id,
    )
    assert push.seq == 8
    assert push.push_id and push.push_id != session.push([], [], acked_seq=0, now_ms=9).push_id


def test_commit_push_records_its_id() -> None:
    """After commit_push the session knows the ID of the last push written."""
    session = agent_session()
    push = session.push([], [b'{"type":"a"}'], acked_seq=0, now_ms=9)
    session.commit_push(push)
    assert session.last_push == push.push_id


def test_push_merges_patches_in_order() -> None:
    """Patches merge one level down, in order: null deletes a key, last_turn stays as it was."""
    session = agent_session()
    before = copy.deepcopy(session.state)
    patches = [
        {"form_answers": {"date": "tue", "phone": "555"}, "context": {"lang": None}},
        {"form_answers": {"date": "wed", "phone": None, "missing": None}},
        {"context": {"lang": "fr", "deep": {"a": [1]}}},
        {"context": {"deep": {"b": 2}}},
    ]
    push = session.push(patches, [], acked_seq=0, now_ms=9)
    assert push.state == {
        "context": {"step": 2, "lang": "fr", "deep": {"b": 2}},
        "form_answers": {"name": "Ada", "date": "wed"},
        "last_turn": {"turn_id": "t4", "at_ms": 3},
    }
    assert push.encoded is not None
    assert codec.loads(push.encoded) == push.state
    assert (push.base_version, push.version) == (4, 5)
    assert (push.base_seq, push.seq, push.messages) == (6, 6, ())
    assert push.epoch == 3
    assert session.state == before
    assert (session.version, session.seq, session.updated_ms) == (4, 6, 3)


def test_push_fills_missing_state_fields() -> None:
    """A patch to a field the state lacks creates it; deleting from it leaves it empty."""
    session = Session(SessionId("s"), ResumeToken("t"), 0, {"last_turn": None}, 1, 1)
    push = session.push(
        [{"context": {"k": 1}}, {"form_answers": {"x": None}}], [], acked_seq=0, now_ms=2
    )
    assert push.state == {"last_turn": None, "context": {"k": 1}, "form_answers": {}}
    assert session.state == {"last_turn": None}


def test_push_clamps_acked_seq() -> None:
    """An acknowledgement beyond the session's seq is clamped to it; one below is kept."""
    session = agent_session()
    assert session.push([], [b"{}"], acked_seq=100, now_ms=1).acked_seq == 6
    assert session.push([], [b"{}"], acked_seq=6, now_ms=1).acked_seq == 6
    assert session.push([], [b"{}"], acked_seq=2, now_ms=1).acked_seq == 2
    assert fresh().push([], [b"{}"], acked_seq=3, now_ms=1).acked_seq == 0


def test_commit_push_with_patch() -> None:
    """commit_push() adopts state, version, seq and time from a push with a patch."""
    session = agent_session()
    push = session.push([{"context": {"step": 3}}], [b"{}"] * 3, acked_seq=0, now_ms=9)
    session.commit_push(push)
    assert session.state is push.state
    assert (session.version, session.seq, session.updated_ms) == (5, 9, 9)
    following = session.push([], [b"{}"], acked_seq=0, now_ms=10)
    assert (following.base_seq, following.seq, following.base_version) == (9, 10, 5)


def test_commit_push_without_patch() -> None:
    """commit_push() of messages alone advances seq and time but keeps state and version."""
    session = agent_session()
    state = session.state
    session.commit_push(session.push([], [b"{}"] * 2, acked_seq=0, now_ms=9))
    assert session.state is state
    assert (session.version, session.seq, session.updated_ms) == (4, 8, 9)
    session.commit_push(session.push([], [], acked_seq=0, now_ms=11))
    assert (session.version, session.seq, session.updated_ms) == (4, 8, 11)


def test_a_key_press_is_recorded_in_last_turn() -> None:
    """A DTMF turn records its key in last_turn and changes no answers."""
    session = fresh()
    write = session.apply(Turn("d1", None, None, None, dtmf="7"), 5)
    assert write.state["last_turn"] == {"turn_id": "d1", "at_ms": 5, "dtmf": "7"}
    assert write.state["form_answers"] == {}
