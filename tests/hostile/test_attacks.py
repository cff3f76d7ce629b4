"""The three attacks of issue 16, re-run against a gateway process with Redis and the demo
agent (``python -m loadtest.hostile``), with short send and keepalive bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from loadtest.hostile import run

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


async def test_the_three_attacks_leave_the_gateway_whole(redis_url: str, tmp_path: Path) -> None:
    """A client that stops reading is cut (with little memory held meanwhile), deep Twilio
    starts leave no agent link and no store write, a last_seq of 2^62 leaves Redis byte for
    byte unchanged and the live connection working, the bystander's session is intact,
    and the gateway's log holds no traceback."""
    report = await run(
        redis_url,
        seconds=30,
        extra=["--send-timeout", "2", "--ping-interval", "5", "--ping-timeout", "5"],
        log=tmp_path / "gateway.log",
    )
    assert report["non_reader"]["cut_after_s"] is not None
    assert report["non_reader"]["cut_after_s"] < 10, report
    assert report["non_reader"]["rss_peak_growth_mib"] < 50, report
    for part in ("non_reader", "twilio_deep", "last_seq", "bystander", "log"):
        assert report[part]["ok"], (part, report[part])
