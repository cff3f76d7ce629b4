"""The store contract, run against every store (memory and Redis) through one factory."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from gateway.core.resume import Outcome, Replay
from gateway.core.session import ResumeToken, Session, SessionId, new_resume_token
from gateway.exceptions import StoreConflict, StoreError
from gateway.store.base import SessionStore, StoreSettings, Written
from tests.support.records import CALLER, OTHER, T0, candidate, new_session, write
from tests.support.stores import StoreFactory


async def answered(store: SessionStore) -> Session:
    """A new session of ``CALLER`` whose turn t1 (name Ada) is written at ``T0 + 1``; the
    session as restored, before that turn."""
    session = await new_session(store)
    await store.write_turn(CALLER, session.session_id, write(session, "t1", T0 + 1, name="Ada"))
    return session


async def test_miss_creates_candidate(store: SessionStore) -> None:
    """A restore for an unknown caller stores and returns the candidate."""
    cand = candidate()
    restored = await store.restore(CALLER, token=None, candidate=cand, now_ms=T0)
    assert restored.outcome is Outcome.MISS
    assert restored.session == cand


async def test_hit_returns_written_state(store: SessionStore) -> None:
    """After turns, a restore with the token returns the last written state, version and turns."""
    first = await new_session(store)
    w1 = write(first, "t1", T0 + 1, name="Zoë ✓")
    assert await store.write_turn(CALLER, first.session_id, w1) == Written(1, applied=True)
    first.commit(w1)
    w2 = write(first, "t2", T0 + 2, date={"day": 3}, name="Ada")  # type: ignore[arg-type]
    assert (await store.write_turn(CALLER, first.session_id, w2)).version == 2
    cand = candidate()
    restored = await store.restore(CALLER, token=first.resume_token, candidate=cand, now_ms=T0 + 5)
    assert restored.outcome is Outcome.HIT
    got = restored.session
    assert got is not None
    # The resume token rotates: the welcome carries the candidate's.
    assert (got.session_id, got.resume_token, got.version) == (
        first.session_id,
        cand.resume_token,
        2,
    )
    assert got.state == w2.state
    assert got.recent_turns == {"t1": 1, "t2": 2}
    assert (got.created_ms, got.updated_ms) == (T0, T0 + 5)


async def test_tokenless_hello_resumes(store: SessionStore) -> None:
    """Without a token (authentication off) a live session is resumed."""
    first = await new_session(store)
    again = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 1)
    assert again.outcome is Outcome.HIT
    assert again.session is not None and again.session.session_id == first.session_id


async def test_wrong_token_refused_and_changes_nothing(store: SessionStore) -> None:
    """A wrong token is refused and does not refresh the session's age."""
    first = await answered(store)
    refused = await store.restore(CALLER, token="wrong", candidate=candidate(), now_ms=T0 + 15_000)
    assert refused == type(refused)(Outcome.REFUSED, None)
    # max_age is 20 s: had the refused hello refreshed it, this would be a hit.
    later = await store.restore(
        CALLER, token=first.resume_token, candidate=candidate(), now_ms=T0 + 21_000
    )
    assert later.outcome is Outcome.STALE


async def test_unwritten_session_answers_as_created(store: SessionStore) -> None:
    """A session with no turn yet is not guarded by its token: a hello with the token of the
    session it replaced (its welcome was lost) gets it, with the answer its creator got."""
    old = await answered(store)
    cand = candidate(T0 + 30_000)
    stale = await store.restore(CALLER, token=old.resume_token, candidate=cand, now_ms=T0 + 30_000)
    assert stale == type(stale)(Outcome.STALE, cand)
    # The welcome carrying cand's token was lost; the client comes back with the old one.
    retry = candidate()
    again = await store.restore(CALLER, token=old.resume_token, candidate=retry, now_ms=T0 + 31_000)
    assert again.outcome is Outcome.STALE
    assert again.session is not None
    assert (again.session.session_id, again.session.resume_token) == (
        cand.session_id,
        retry.resume_token,
    )
    # Once a turn is written, the token guards the session again.
    await store.write_turn(
        CALLER, cand.session_id, write(again.session, "t1", T0 + 32_000, name="Bea")
    )
    refused = await store.restore(
        CALLER, token=old.resume_token, candidate=candidate(), now_ms=T0 + 33_000
    )
    assert refused.outcome is Outcome.REFUSED


async def test_callers_are_isolated(store: SessionStore) -> None:
    """Two call IDs of one number are two sessions."""
    a = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0)).session
    b = await store.restore(OTHER, token=None, candidate=candidate(), now_ms=T0)
    assert a is not None and b.session is not None
    assert b.outcome is Outcome.MISS
    assert a.session_id != b.session.session_id


async def test_duplicate_turn_returns_first_version(store: SessionStore) -> None:
    """A turn ID written before returns its version and changes nothing."""
    s = await new_session(store)
    w1 = write(s, "t1", T0 + 1, name="Ada")
    await store.write_turn(CALLER, s.session_id, w1)
    s.commit(w1)
    await store.write_turn(CALLER, s.session_id, write(s, "t2", T0 + 2, name="Bob"))
    replay = dataclasses.replace(w1, base_version=2, version=3, state={"bogus": True})
    assert await store.write_turn(CALLER, s.session_id, replay) == Written(1, applied=False)
    got = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 3)).session
    assert got is not None and got.version == 2
    assert got.state["form_answers"] == {"name": "Bob"}


async def test_retried_write_after_lost_reply_counts_as_applied(store: SessionStore) -> None:
    """The same write sent again (its reply was lost) reports applied, so it is adopted."""
    s = await new_session(store)
    w1 = write(s, "t1", T0 + 1, name="Ada")
    assert await store.write_turn(CALLER, s.session_id, w1) == Written(1, applied=True)
    assert await store.write_turn(CALLER, s.session_id, w1) == Written(1, applied=True)
    other = write(s, "t1", T0 + 2, name="Bob")  # same turn ID, another write: not ours
    assert await store.write_turn(CALLER, s.session_id, other) == Written(1, applied=False)


async def test_stale_version_conflicts(store: SessionStore) -> None:
    """A write based on an old version is refused: no lost update."""
    s = await answered(store)
    with pytest.raises(StoreConflict, match="version is 1"):
        await store.write_turn(CALLER, s.session_id, write(s, "t2", T0 + 2, name="Bob"))


async def test_write_to_unknown_session_conflicts(store: SessionStore) -> None:
    """A write for a session ID that is not stored is refused."""
    s = await new_session(store)
    with pytest.raises(StoreConflict):
        await store.write_turn(CALLER, SessionId("s_other"), write(s, "t1", T0 + 1))
    with pytest.raises(StoreConflict):
        await store.write_turn(OTHER, s.session_id, write(s, "t1", T0 + 1))


async def test_stale_session_replaced(store: SessionStore) -> None:
    """A session idle past max_age is replaced by the candidate, turns and all."""
    s = await answered(store)
    cand = candidate(T0 + 30_000)
    restored = await store.restore(CALLER, token=s.resume_token, candidate=cand, now_ms=T0 + 30_000)
    assert restored.outcome is Outcome.STALE
    assert restored.session == cand
    # The old session's turns are gone and its writes are refused.
    fresh = cand
    assert (
        await store.write_turn(CALLER, fresh.session_id, write(fresh, "t1", T0 + 30_001))
    ).version == 1
    with pytest.raises(StoreConflict):
        await store.write_turn(CALLER, s.session_id, write(s, "t9", T0 + 30_002))


async def test_retried_restore_answers_as_first_attempt(store: SessionStore) -> None:
    """A restore retried with the same candidate (its reply was lost) gets the same answer,
    even though the hello's token belonged to the session the first attempt replaced."""
    old = await new_session(store)
    cand = candidate(T0 + 30_000)
    for _ in range(2):
        again = await store.restore(
            CALLER, token=old.resume_token, candidate=cand, now_ms=T0 + 30_000
        )
        assert again == type(again)(Outcome.STALE, cand)
    cand = candidate()
    for _ in range(2):
        fresh = await store.restore(
            OTHER, token="from-an-expired-session", candidate=cand, now_ms=T0
        )
        assert fresh == type(fresh)(Outcome.MISS, cand)


async def test_touch_restarts_age(store: SessionStore) -> None:
    """touch() on disconnect restarts the max_age clock."""
    s = await new_session(store)
    await store.touch(CALLER, s.session_id, T0 + 15_000, epoch=s.epoch, owner="")
    restored = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 30_000)
    assert restored.outcome is Outcome.HIT


async def test_end_refuses_resume_and_writes(store: SessionStore) -> None:
    """After end(), hellos get ENDED and writes are refused; touch and end do nothing more."""
    s = await new_session(store)
    await store.end(CALLER, s.session_id, T0 + 1, epoch=s.epoch)
    await store.end(CALLER, s.session_id, T0 + 2, epoch=s.epoch)
    await store.touch(CALLER, s.session_id, T0 + 3, epoch=s.epoch, owner="")
    again = await store.restore(CALLER, token=s.resume_token, candidate=candidate(), now_ms=T0 + 4)
    assert again.outcome is Outcome.ENDED
    assert again.session is None
    with pytest.raises(StoreConflict, match="ended"):
        await store.write_turn(CALLER, s.session_id, write(s, "t1", T0 + 5))


async def test_keys_expire_after_ttl(make_store: StoreFactory, settings: StoreSettings) -> None:
    """A session not written for longer than ttl is gone: the next hello is a miss."""
    store = make_store(dataclasses.replace(settings, ttl=0.3, max_age=None))
    try:
        now = T0
        s = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=now)).session
        assert s is not None
        await asyncio.sleep(0.4)
        now += 400
        restored = await store.restore(CALLER, token=None, candidate=candidate(now), now_ms=now)
        assert restored.outcome is Outcome.MISS
    finally:
        await store.aclose()


async def test_ping(store: SessionStore) -> None:
    """A reachable store answers ping."""
    await store.ping()


def test_token_type_is_str() -> None:
    """Resume tokens are URL-safe text (they travel in JSON and query strings)."""
    token = new_resume_token()
    assert isinstance(token, str) and token == ResumeToken(token)
    assert token.replace("-", "").replace("_", "").isalnum()


async def test_resume_tokens_rotate_and_a_retired_one_is_a_replay(store: SessionStore) -> None:
    """Each resume issues a new token. The one it replaced still resumes until the new one
    is used (a lost welcome); after that it is refused as a replay."""
    first = await answered(store)
    a = first.resume_token
    second = await store.restore(CALLER, token=a, candidate=candidate(), now_ms=T0 + 2)
    assert second.session is not None
    b = second.session.resume_token
    assert b != a
    # b's welcome was lost: a still works, twice over, and issues c.
    lost = await store.restore(CALLER, token=a, candidate=candidate(), now_ms=T0 + 3)
    assert lost.outcome is Outcome.HIT and lost.session is not None
    c = lost.session.resume_token
    # c is used: a and b retire; a is the token before the previous one, b the previous.
    third = await store.restore(CALLER, token=c, candidate=candidate(), now_ms=T0 + 4)
    assert third.outcome is Outcome.HIT and third.session is not None
    d = third.session.resume_token
    replay = await store.restore(CALLER, token=a, candidate=candidate(), now_ms=T0 + 5)
    assert (replay.outcome, replay.session, replay.replayed) == (Outcome.REFUSED, None, True)
    guessed = await store.restore(CALLER, token="guess", candidate=candidate(), now_ms=T0 + 6)
    assert (guessed.outcome, guessed.replayed) == (Outcome.REFUSED, False)
    # c is now the previous token, valid until d is first used. Coming back with c (d's
    # welcome lost) issues e, and d becomes the spare; once e is used, d and c are gone.
    back = await store.restore(CALLER, token=c, candidate=candidate(), now_ms=T0 + 7)
    assert back.session is not None
    e = back.session.resume_token
    fifth = await store.restore(CALLER, token=e, candidate=candidate(), now_ms=T0 + 9)
    assert fifth.outcome is Outcome.HIT
    assert (
        await store.restore(CALLER, token=d, candidate=candidate(), now_ms=T0 + 10)
    ).session is None
    stale_c = await store.restore(CALLER, token=c, candidate=candidate(), now_ms=T0 + 11)
    assert (stale_c.outcome, stale_c.replayed) == (Outcome.REFUSED, True)


async def test_a_retried_resume_rotates_once(store: SessionStore) -> None:
    """The same resume sent twice (its reply was lost) leaves both the presented token and
    the new one valid, as one resume would."""
    first = await answered(store)
    cand = candidate()
    for now in (T0 + 2, T0 + 3):
        got = await store.restore(CALLER, token=first.resume_token, candidate=cand, now_ms=now)
        assert got.outcome is Outcome.HIT
    # As after one resume: the new token resumes, and then the old one is retired.
    assert (
        await store.restore(CALLER, token=cand.resume_token, candidate=candidate(), now_ms=T0 + 4)
    ).outcome is Outcome.HIT
    old = await store.restore(
        CALLER, token=first.resume_token, candidate=candidate(), now_ms=T0 + 5
    )
    assert (old.outcome, old.replayed) == (Outcome.REFUSED, True)


async def test_a_late_resume_with_the_previous_token_locks_nobody_out(
    store: SessionStore,
) -> None:
    """Two resumes present the same token; the slower lands after the client already used the
    token the faster one issued: that token still resumes (the spare), so a racing resume
    cannot lock the caller out."""
    first = await answered(store)
    a = first.resume_token
    fast = await store.restore(CALLER, token=a, candidate=candidate(), now_ms=T0 + 2)
    assert fast.session is not None
    late = await store.restore(CALLER, token=a, candidate=candidate(), now_ms=T0 + 3)
    assert late.outcome is Outcome.HIT
    held = fast.session.resume_token  # what the client got from the faster resume
    again = await store.restore(CALLER, token=held, candidate=candidate(), now_ms=T0 + 4)
    assert again.outcome is Outcome.HIT


async def test_new_session_replay_starts_at_one(store: SessionStore) -> None:
    """A hello with last_seq 5 that gets a new session is told the replay is partial from 1,
    since the new session has sent nothing (docs/protocol.md, Messages and replay)."""
    got = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0, last_seq=5)
    assert got.outcome is Outcome.MISS
    assert (got.replay, got.messages) == (Replay(1, partial=True), ())
    fresh = await store.restore(OTHER, token=None, candidate=candidate(), now_ms=T0, last_seq=0)
    assert fresh.replay == Replay(1, partial=False)


@pytest.mark.parametrize("last_seq", [-1, 2**53, 2**62])
async def test_out_of_range_last_seq_is_refused_and_changes_nothing(
    store: SessionStore, last_seq: int
) -> None:
    """A resume with last_seq out of 0..2**53-1 fails with an error that is not retried, and
    the session is untouched: its live connection goes on writing at its epoch."""
    first = candidate()
    s = (await store.restore(CALLER, token=None, candidate=first, now_ms=T0)).session
    assert s is not None
    with pytest.raises(StoreError) as caught:
        await store.restore(
            CALLER,
            token=first.resume_token,
            candidate=candidate(),
            now_ms=T0 + 1,
            last_seq=last_seq,
        )
    assert (caught.value.retryable, caught.value.detail) == (False, "bad argument last_seq")
    assert not isinstance(caught.value, StoreConflict)
    assert (await store.write_turn(CALLER, s.session_id, write(s, "t1", T0 + 2))).applied
    again = await store.restore(
        CALLER, token=first.resume_token, candidate=candidate(), now_ms=T0 + 3
    )
    assert again.session is not None and again.session.epoch == s.epoch + 1


async def test_resent_turn_restarts_age(store: SessionStore) -> None:
    """A turn sent again later (already applied) counts as activity: it restarts max_age."""
    s = await answered(store)
    resent = write(s, "t1", T0 + 15_000, name="Ada")
    assert await store.write_turn(CALLER, s.session_id, resent) == Written(1, applied=False)
    # max_age is 20 s: 29 s after the first write, 14 s after the re-sent one.
    later = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 29_000)
    assert later.outcome is Outcome.HIT
