"""Applying turns to session state."""

from __future__ import annotations

from gateway.core.events import Turn
from gateway.core.session import (
    RECENT_TURNS,
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
