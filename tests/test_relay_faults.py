"""Relay guarantees under real process faults: the gateway or the voice agent is killed with
SIGKILL mid-conversation, and every caller still gets every agent message exactly once, in
order, with no acked turn lost."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.config import Config
from tests.support.gateway_process import GatewayProcess
from tests.support.gateways import GatewayFactory
from tests.support.redis_server import RedisServer
from tests.support.relayclient import Caller
from tests.support.wsclient import url

ANSWERS = [("name", "Alice"), ("date", "Friday"), ("reason", "a checkup"), ("confirm", "yes")]
BOOKED = {"name": "Alice", "date": "Friday", "reason": "a checkup", "confirm": "yes"}
CALLERS = 12


async def answer(caller: Caller, n: int) -> None:
    field, text = ANSWERS[n]
    await caller.asks(field)
    await caller.turn(f"t{n}", text)


async def test_gateway_sigkill_mid_conversation(
    tmp_path: Path, own_redis: RedisServer, demo_agent: GatewayProcess
) -> None:
    """After the gateway is killed and another started, every caller resumes from Redis alone:
    the demo agent continues each form where it stood and no message is lost or repeated."""
    args = ["--redis-url", own_redis.url, "--downstream", f"ws://127.0.0.1:{demo_agent.port}/"]
    first = GatewayProcess(tmp_path / "first.log", *args)
    first.start()
    try:
        callers = [
            Caller(url(first.port), {"user_id": f"u{i}", "call_id": "c1"}) for i in range(CALLERS)
        ]
        for caller in callers:
            await caller.connect()
        await asyncio.gather(*(answer(c, 0) for c in callers))
        # Half of them also hear the agent's next question before the crash.
        await asyncio.gather(*(c.asks("date") for c in callers[::2]))
    finally:
        first.kill()
    second = GatewayProcess(tmp_path / "second.log", *args)
    second.start()
    try:
        for caller in callers:
            caller.url = url(second.port)
            welcome = await caller.connect()
            assert welcome["resumed"] is True
            assert welcome["state"]["last_turn"]["text"] == "Alice"
        for n in range(1, len(ANSWERS)):
            await asyncio.gather(*(answer(c, n) for c in callers))
        await asyncio.gather(*(c.asks(None) for c in callers))
        for caller in callers:
            await caller.aclose()
            welcome = await caller.connect()
            assert welcome["state"]["form_answers"] == BOOKED
            await caller.aclose()
    finally:
        second.kill()
    for caller in callers:
        assert any(m["text"].startswith("Booked: Alice on Friday") for m in caller.messages)


@pytest.mark.stores("redis")
async def test_agent_sigkill_and_restart(
    tmp_path: Path,
    make_gateway: GatewayFactory,
    store_config: Config,
    demo_agent: GatewayProcess,
) -> None:
    """The agent is killed mid-conversation and restarted: the client stays connected and is
    told nothing, its turn made meanwhile is acked, and the redialled agent, resumed with the
    state, answers it."""
    cfg = store_config.replace(
        "agent", downstream=f"ws://127.0.0.1:{demo_agent.port}/", agent_retry_max_delay=0.2
    )
    async with make_gateway(cfg) as gw:
        caller = Caller(url(gw.port), {"user_id": "u-agent", "call_id": "c1"})
        await caller.connect()
        await answer(caller, 0)
        await caller.asks("date")
        demo_agent.kill()
        while gw.metrics.registry.get_sample_value("hangon_agent_links_active") != 0:
            await asyncio.sleep(0.01)
        ack = await caller.turn("t1", "Friday")
        assert ack["version"] == 3  # the patch recording the name was version 2
        restarted = GatewayProcess(
            tmp_path / "agent2.log", command="demo-agent", port=demo_agent.port
        )
        restarted.start()
        try:
            await answer(caller, 2)
            await answer(caller, 3)
            await caller.asks(None)
        finally:
            restarted.kill()
        assert caller.ws is not None and caller.ws.close_code is None
        await caller.aclose()
        connects = gw.metrics.registry.get_sample_value(
            "hangon_agent_connects_total", {"outcome": "ok"}
        )
        welcome = await caller.connect()
        await caller.aclose()
    assert connects == 2
    assert welcome["state"]["form_answers"] == BOOKED
    assert [m["field"] for m in caller.messages] == ["name", "date", "reason", "confirm", None]
