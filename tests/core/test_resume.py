"""Resume decisions."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.resume import Decision, Outcome, classify

BASE: dict[str, Any] = dict(
    exists=True,
    ended=False,
    updated_ms=1000,
    stored_token="tok",
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
        ({"token": "old", "version": 0}, Decision(MISS, replace=False)),
        ({"token": "old", "version": 0, "origin": STALE}, Decision(STALE, replace=False)),
        ({"version": 0, "origin": STALE}, Decision(HIT, replace=False)),
    ],
)
def test_classify(changes: dict[str, Any], decision: Decision) -> None:
    """classify() orders its checks: missing, ended, stale, token (unless unwritten), hit."""
    assert classify(**{**BASE, **changes}) == decision
