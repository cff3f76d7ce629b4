"""The storm tool against real gateway processes: it restores and verifies every session in
each mode, and it names the sessions when a gateway loses what it acknowledged."""

from __future__ import annotations

import base64
import sys
from pathlib import Path
from typing import Any

import pytest

from loadtest.storm import parser, run_storm
from tests.support.authkeys import ACME_SECRET, keys_document
from tests.support.redis_server import RedisServer, free_port

pytestmark = pytest.mark.slow


async def storm(
    tmp_path: Path, mode: str, store: list[str], *extra: str, quiet: bool = True
) -> dict[str, Any]:
    port = free_port()
    command = (
        f"{sys.executable} -m gateway serve --port {port} --downstream off --drain-period 0.5 "
        + " ".join(store)
    )
    args = parser().parse_args(
        [
            "--url",
            f"ws://127.0.0.1:{port}/ws",
            "--sessions",
            "40",
            "--turns",
            "3",
            "--mode",
            mode,
            "--gateway-cmd",
            command,
            "--gateway-log",
            str(tmp_path / "gateway.log"),
            "--initial-delay",
            "0.1",
            "--timeout",
            "30",
            *(["--quiet"] if quiet else []),
            *extra,
        ]
    )
    return await run_storm(args)


@pytest.mark.parametrize("mode", ["drop", "kill", "drain"])
async def test_every_session_comes_back_whole(
    tmp_path: Path, own_redis: RedisServer, mode: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """On Redis, every session is restored whole after a drop, a kill and a drain, the
    result carries the figures the report plots and the times of the storm and the restart,
    and the progress (stderr is no TTY here) is one line per phase with its final count."""
    result = await storm(tmp_path, mode, ["--redis-url", own_redis.url], quiet=False)
    progress = [line.split(" in ")[0] for line in capsys.readouterr().err.splitlines()]
    assert progress == ["connect: 40/40", "turns: 120/120", "storm: 40/40", "verify: 40/40"]
    assert result["ok"], result["violations"][:5]
    assert result["verified"] == 40 and result["storm"]["restored"] == 40
    assert result["turns"]["acked"] == 120
    assert len(result["restore_latency_ms"]["samples"]) == 40
    assert result["restored_over_time"][-1][1] == 40
    assert result["gateway"]["peak_rss_mb"] > 0 and result["gateway"]["rss_over_time"]
    assert result["redis"]["round_trips_per_turn"] > 0
    events = result["gateway"]["events_s"]
    assert events["connect"] < events["storm"] < events["all_restored"]
    if mode == "drop":
        assert "restarted" not in events and "stopped" not in events
        assert "gateway_restart_s" not in result["storm"]
    else:
        assert events["storm"] <= events["stopped"] <= events["restarted"]
        assert events["restarted"] < events["all_restored"]
        assert 0 < result["storm"]["gateway_restart_s"] <= result["storm"]["all_restored_s"]


async def test_a_storm_with_signed_tokens(tmp_path: Path, own_redis: RedisServer) -> None:
    """Against a gateway that requires tokens, sessions that sign theirs with --token-key
    come back whole after a drop; none is refused."""
    keys = tmp_path / "keys.json"
    keys.write_text(keys_document())
    secret = base64.b64encode(ACME_SECRET).decode()
    result = await storm(
        tmp_path,
        "drop",
        ["--redis-url", own_redis.url, "--auth-keys", str(keys)],
        "--tenant",
        "acme",
        "--token-key",
        f"acme-1:{secret}",
    )
    assert result["ok"], result["violations"][:5]
    assert result["verified"] == 40 and result["storm"]["restored"] == 40
    assert "hello refused auth" not in (tmp_path / "gateway.log").read_text()


async def test_a_gateway_that_forgets_is_caught(tmp_path: Path) -> None:
    """The memory store loses everything when the gateway is killed: the tool reports every
    session by name, with what it restored and what had been acknowledged."""
    result = await storm(tmp_path, "kill", [])
    assert not result["ok"]
    problems: dict[str, list[str]] = {}
    for v in result["violations"]:
        problems.setdefault(v["session"], []).append(v["problem"])
    assert set(problems) == {f"storm-{i}" for i in range(40)}
    for found in problems.values():
        assert any(p.startswith("restored session") for p in found), found
        assert any(p.startswith("restored answers {}") for p in found), found
        assert "welcome after the storm says resumed: false" in found
