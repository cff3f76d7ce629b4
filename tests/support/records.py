"""Sessions and writes for the store tests."""

from __future__ import annotations

from gateway.core import codec
from gateway.core.callerkey import CallerKey
from gateway.core.session import (
    Session,
    TurnWrite,
    empty_state,
    new_resume_token,
    new_session_id,
)
from gateway.store.base import SessionStore

__all__ = ["CALLER", "OTHER", "T0", "candidate", "new_session", "write"]

CALLER = CallerKey("acme", "phone", "+14155550100", "call-1")
OTHER = CallerKey("acme", "phone", "+14155550100", "call-2")
T0 = 1_800_000_000_000


def candidate(now: int = T0) -> Session:
    return Session(new_session_id(), new_resume_token(), 0, empty_state(), now, now)


async def new_session(store: SessionStore, caller: CallerKey = CALLER) -> Session:
    """Restore ``caller``, who has no session yet, at ``T0``: the candidate that is stored."""
    session = (await store.restore(caller, token=None, candidate=candidate(), now_ms=T0)).session
    assert session is not None
    return session


def write(session: Session, turn_id: str, at: int, **form: str) -> TurnWrite:
    state = {**session.state, "form_answers": {**session.state["form_answers"], **form}}
    return TurnWrite(
        turn_id,
        session.version,
        session.version + 1,
        state,
        at,
        codec.dumps(state),
        session.epoch,
        new_session_id(),
    )
