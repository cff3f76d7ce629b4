"""The calibration baseline measures a real bare websockets server and refuses other targets."""

from __future__ import annotations

import pytest

from loadtest.baseline import measure_bare, open_connections


async def test_measure_bare_reports_every_field_with_positive_values() -> None:
    """A small run reports connect, drop-storm and echo costs of the server, all positive and
    ordered."""
    # Enough work for several clock ticks of server CPU (10 ms each), so no delta is zero.
    report = await measure_bare(sessions=200, messages=3000, rounds=2, timeout=50)
    assert report["tool"] == "hangon-baseline"
    assert (report["sessions"], report["messages"], report["rounds"]) == (200, 3000, 2)
    connect = report["connect"]
    assert connect["seconds"] > 0
    assert connect["rate_per_s"] > 0
    latency = connect["latency_ms"]
    assert 0 < latency["p50"] <= latency["p95"] <= latency["p99"] <= latency["max"]
    assert connect["server_cpu_ms_per_connection"] > 0
    assert connect["server_rss_kib_per_connection"] > 0
    storm = connect["drop_storm"]
    assert storm["seconds"] > 0
    assert storm["server_cpu_ms_per_reconnect"] > 0
    # The median of the rounds lies between the lowest and the highest of them.
    low, high = (storm[f"server_cpu_ms_per_reconnect_{end}"] for end in ("lowest", "highest"))
    assert 0 < low <= storm["server_cpu_ms_per_reconnect"] <= high
    echo = report["echo"]
    assert echo["server_cpu_us_per_message"] > 0
    low, high = (echo[f"server_cpu_us_per_message_{end}"] for end in ("lowest", "highest"))
    assert 0 < low <= echo["server_cpu_us_per_message"] <= high
    assert echo["messages_per_cpu_second"] > 0
    machine = report["machine"]
    assert machine["cpus"] >= 1
    assert machine["platform"] and machine["python"]
    assert len(report["date"]) == len("2026-01-01")


async def test_non_loopback_target_is_refused() -> None:
    """open_connections refuses a target outside 127.0.0.0/8, ::1 and localhost."""
    with pytest.raises(SystemExit, match="only loopback"):
        await open_connections("ws://192.0.2.1:9/", 1)


async def test_empty_measurement_is_refused() -> None:
    """measure_bare needs at least one session and one message."""
    with pytest.raises(ValueError, match="at least 1"):
        await measure_bare(sessions=0, messages=10)
    with pytest.raises(ValueError, match="at least 1"):
        await measure_bare(sessions=10, messages=10, rounds=0)
