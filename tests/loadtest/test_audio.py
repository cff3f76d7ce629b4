"""The audio tool end to end: calls at real-time pace through hangon and the bare relay, every
frame echoed and timed, the relay's CPU counted per frame, and a report with both histograms."""

from __future__ import annotations

import sys

import pytest

from loadtest.audio import html, parse, run

pytestmark = pytest.mark.slow


async def test_every_frame_comes_back_through_both_relays() -> None:
    args = parse(
        [
            "--calls",
            "4",
            "--seconds",
            "1",
            "--gateway-cmd",
            f"{sys.executable} -m gateway serve --port 0",
        ]
    )
    result = await run(args)
    for name in ("hangon", "bare"):
        relay = result[name]
        assert relay["frames_lost"] == 0, relay
        assert relay["frames_sent"] == 4 * 100  # a warm-up second and a measured one
        assert relay["frames_echoed_measured"] >= 4 * 45, relay  # about 50 per call-second
        assert relay["cpu_us_per_frame"] > 0 and relay["calls_per_core"] > 0
        assert 0 < relay["rtt_ms"]["p50"] <= relay["rtt_ms"]["p99"]
    assert result["cpu_per_frame_ratio"] > 0
    page = html(result)
    assert page.count("<svg") == 2 and "Audio round trip, hangon" in page
