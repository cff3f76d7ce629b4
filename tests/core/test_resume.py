"""Resume decisions."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.resume import (
    Decision,
    Outcome,
    Replay,
    Tokens,
    classify,
    plan_replay,
    token_digest,
)

BASE: dict[str, Any] = dict(
    exists=True,
    ended=False,
    updated_ms=1000,
    tokens=Tokens("tok", "old", "dead"),
    token="tok",
    version=3,
    origin=Outcome.MISS,
    now_ms=2000,
    max_age_ms=5000,
)
HIT, MISS, STALE = Outcome.HIT, Outcome.MISS, Outcome.STALE


@pytest.mark.parametrize(
    ("changes", "decision"),
    [
        ({}, Decision(HIT, replace=False)),
        ({"token": None}, Decision(HIT, replace=False)),
        ({"max_age_ms": None, "now_ms": 10**12}, Decision(HIT, replace=False)),
        ({"now_ms": 6000}, Decision(HIT, replace=False)),
        ({"exists": False}, Decision(MISS, replace=True)),
        ({"ended": True, "token": "bad"}, Decision(Outcome.ENDED, replace=False)),
        ({"now_ms": 6001}, Decision(STALE, replace=True)),
        ({"now_ms": 6001, "token": "bad"}, Decision(STALE, replace=True)),
        ({"token": "bad"}, Decision(Outcome.REFUSED, replace=False)),
        ({"token": "to"}, Decision(Outcome.REFUSED, replace=False)),
        ({"token": ""}, Decision(Outcome.REFUSED, replace=False)),
        ({"token": "old", "version": 3}, Decision(HIT, replace=False)),
        ({"token": "dead"}, Decision(Outcome.REFUSED, replace=False, replayed=True)),
        ({"token": "", "tokens": Tokens("tok")}, Decision(Outcome.REFUSED, replace=False)),
        ({"token": "other", "version": 0}, Decision(MISS, replace=False)),
        ({"token": "other", "version": 0, "origin": STALE}, Decision(STALE, replace=False)),
        ({"version": 0, "origin": STALE}, Decision(HIT, replace=False)),
    ],
)
def test_classify(changes: dict[str, Any], decision: Decision) -> None:
    """classify() orders its checks: missing, ended, stale, token (unless unwritten), hit."""
    assert classify(**{**BASE, **changes}) == decision


@pytest.mark.parametrize(
    ("last_seq", "seq", "first", "replay"),
    [
        # No position, everything held from 1: the whole history.
        (None, 5, 1, Replay(1, partial=False)),
        (0, 5, 1, Replay(1, partial=False)),
        (None, 0, 1, Replay(1, partial=False)),
        # A position inside the window: from the next one.
        (3, 5, 1, Replay(4, partial=False)),
        (3, 10, 4, Replay(4, partial=False)),
        (9, 10, 4, Replay(10, partial=False)),
        # Up to date: nothing to send, and nothing missed.
        (5, 5, 1, Replay(6, partial=False)),
        (5, 5, 6, Replay(6, partial=False)),
        (0, 0, 1, Replay(1, partial=False)),
        # The next message the client needs is gone: from the oldest held.
        (2, 10, 4, Replay(4, partial=True)),
        (None, 10, 4, Replay(4, partial=True)),
        (0, 10, 4, Replay(4, partial=True)),
        # Nothing held at all, yet the client is behind.
        (None, 5, 6, Replay(6, partial=True)),
        (3, 5, 6, Replay(6, partial=True)),
        (4, 5, 6, Replay(6, partial=True)),
        # The client saw more than the store knows of.
        (6, 5, 1, Replay(6, partial=True)),
        (6, 5, 6, Replay(6, partial=True)),
        (99, 5, 3, Replay(6, partial=True)),
        (1, 0, 1, Replay(1, partial=True)),
    ],
)
def test_plan_replay(last_seq: int | None, seq: int, first: int, replay: Replay) -> None:
    """plan_replay() resends from last_seq + 1 if held, else says partial and where it starts."""
    assert plan_replay(last_seq, seq=seq, first=first) == replay


def test_tokens_rotate_on_every_resume() -> None:
    """A resume with the current token (or none) retires the previous one; with the previous
    one (its welcome was lost) it stays valid and the current one becomes the spare;
    retrying the same resume changes nothing."""
    t = Tokens("a")
    assert t.accepts("a") and not t.accepts("") and not t.accepts("b")
    t = t.rotate("a", "b")  # welcome carried b
    assert t == Tokens("b", "a", "")
    lost = t.rotate("a", "c")  # b's welcome was lost (or raced): back with a; b is the spare
    assert lost == Tokens("c", "a", "", "b") and lost.rotate("a", "c") == lost
    assert lost.accepts("b") and lost.accepts("c") and lost.accepts("a")
    spare_used = lost.rotate("b", "d")  # b's welcome had arrived after all
    assert spare_used == Tokens("d", "b", "a") and spare_used.rotate("b", "d") == spare_used
    used = t.rotate("b", "c")  # b arrived and is used: a retires
    assert used == Tokens("c", "b", "a")
    assert not used.accepts("a") and used.accepts("b") and used.accepts("c")
    assert used.rotate(None, "d") == Tokens("d", "c", "b")
    assert Tokens("x").rotate(None, "y") == Tokens("y", "x", "")


def test_token_digest_is_sha256() -> None:
    """The store keeps the SHA-256 of a token, in hex."""
    assert token_digest("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
