"""The browser client (gateway/static/client.js) under Node: its logic under Node's test
runner, then the module itself against a real gateway that is SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).parent.parent


@pytest.fixture(scope="session")
def node() -> str:
    """Node.js 20 or later (apt's nodejs, installed when root and missing)."""
    found = shutil.which("node")
    if found is None and os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "install", "-y", "-q", "nodejs"], env=env, capture_output=True)
        found = shutil.which("node")
    if found is None:
        pytest.skip("node not found: apt-get install nodejs")
    return found


def test_logic_under_node_test_runner(node: str) -> None:
    """Backoff, close codes, resume, storage, heartbeat and retry hints (node --test)."""
    result = subprocess.run(
        [node, "--test", str(ROOT / "tests/js/client.test.mjs")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "# fail 0" in result.stdout


@pytest.mark.slow
async def test_module_rides_out_a_gateway_restart(
    node: str, tmp_path: Path, own_redis: RedisServer
) -> None:
    """client.js over a real WebSocket: after a SIGKILL and restart of the gateway it
    reconnects by itself, resumes the session (the demo agent asks the next field), gets
    its next turn acked once and every agent message once, in order."""
    args = ["--redis-url", own_redis.url, "--downstream", "demo"]
    first = GatewayProcess(tmp_path / "first.log", *args)
    first.start()
    second = GatewayProcess(tmp_path / "second.log", *args, port=first.port)
    proc = await asyncio.create_subprocess_exec(
        node,
        "--experimental-websocket",
        "--no-warnings",
        str(ROOT / "tests/js/drive.mjs"),
        f"ws://127.0.0.1:{first.port}/ws",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        ready = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert ready == b"ready\n", ready
        await asyncio.to_thread(first.kill)
        await asyncio.to_thread(second.start)
        proc.stdin.write(b"go\n")
        await proc.stdin.drain()
        seen = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
        second.terminate()
    assert [r["resumed"] for r in seen["restored"]] == [False, True]
    assert seen["restored"][1]["state"]["form_answers"]["name"] == "Ada"
    assert seen["messages"] == list(range(1, len(seen["messages"]) + 1))
    assert seen["acks"][0] < seen["acks"][1]
    assert seen["state"]["form_answers"]["date"] == "Friday"
    assert seen["reconnecting"][0] is None  # a drop without a close frame
