"""Resume decisions."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.resume import Outcome, classify

BASE: dict[str, Any] = dict(
    exists=True,
    ended=False,
    updated_ms=1000,
    stored_token="tok",
    token="tok",
    now_ms=2000,
    max_age_ms=5000,
)


@pytest.mark.parametrize(
    ("changes", "outcome"),
    [
        ({}, Outcome.HIT),
        ({"token": None}, Outcome.HIT),
        ({"max_age_ms": None, "now_ms": 10**12}, Outcome.HIT),
        ({"now_ms": 6000}, Outcome.HIT),
        ({"exists": False}, Outcome.MISS),
        ({"ended": True, "token": "bad"}, Outcome.ENDED),
        ({"now_ms": 6001}, Outcome.STALE),
        ({"now_ms": 6001, "token": "bad"}, Outcome.STALE),
        ({"token": "bad"}, Outcome.REFUSED),
        ({"token": "to"}, Outcome.REFUSED),
    ],
)
def test_classify(changes: dict[str, Any], outcome: Outcome) -> None:
    """classify() orders its checks: missing, ended, stale, token, hit."""
    assert classify(**{**BASE, **changes}) is outcome
