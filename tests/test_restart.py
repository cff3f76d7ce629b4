"""Crash and restart: SIGKILL the gateway mid-conversation; a new process restores every
acknowledged turn, and a re-sent unacknowledged turn is applied exactly once."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from tests.gateway_process import GatewayProcess
from tests.redis_server import RedisServer
from tests.wsclient import connect, hello, recv, send, turn, url

SESSIONS = 30


@pytest.fixture
def gateway_args(own_redis: RedisServer) -> list[str]:
    return ["--redis-url", own_redis.url, "--downstream", "off"]


@pytest.fixture
def first(tmp_path: Path, gateway_args: list[str]) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path / "first.log", *gateway_args)
    gw.start()
    yield gw
    if gw.proc is not None and gw.proc.poll() is None:
        gw.kill()


class Caller:
    """One client's view: what it sent and which turns were acknowledged."""

    def __init__(self, i: int) -> None:
        self.caller = {"phone": f"+1415555{i:04d}", "call_id": f"restart-{i}"}
        self.token = ""
        self.acked: dict[str, Any] = {}
        self.version = 0
        self.in_flight: tuple[str, dict[str, Any]] | None = None
        self.in_flight_acked = False


async def converse(port: int, c: Caller, turns: int, gate: asyncio.Event) -> None:
    async with connect(url(port)) as ws:
        welcome = await hello(ws, c.caller)
        c.token = welcome["resume_token"]
        for n in range(turns):
            form = {f"field{n}": f"{c.caller['call_id']}-{n}"}
            ack = await turn(ws, f"t{n}", form=form)
            assert ack["version"] == n + 1
            c.acked.update(form)
            c.version = ack["version"]
        await gate.wait()
        # One more turn, which the crash catches before or after its write.
        c.in_flight = (f"t{turns}", {"late": c.caller["call_id"]})
        await send(ws, {"type": "turn", "turn_id": c.in_flight[0], "form": c.in_flight[1]})
        while True:  # until the crash drops the connection
            ack = await recv(ws, timeout=60)
            assert ack == {"type": "ack", "turn_id": c.in_flight[0], "version": c.version + 1}
            c.acked.update(c.in_flight[1])
            c.version = ack["version"]
            c.in_flight_acked = True


@pytest.mark.slow
async def test_sigkill_loses_no_acked_turn(
    first: GatewayProcess, tmp_path: Path, gateway_args: list[str], own_redis: RedisServer
) -> None:
    """After SIGKILL and a fresh start, each session gets exactly its acked state back.

    Half the sessions send their last turn while Redis runs (it is written, and
    usually acked), half while Redis pauses writes (it is never written): the
    re-sent turn must be applied exactly once either way.
    """
    callers = [Caller(i) for i in range(SESSIONS)]
    written, paused = callers[: SESSIONS // 2], callers[SESSIONS // 2 :]
    gates = {id(c): asyncio.Event() for c in callers}
    rng = random.Random(7)
    tasks = [
        asyncio.create_task(converse(first.port, c, rng.randint(1, 6), gates[id(c)]))
        for c in callers
    ]

    async def wait_in_flight(group: list[Caller]) -> None:
        for c in group:
            gates[id(c)].set()
        while any(c.in_flight is None for c in group):
            for t in tasks:
                if t.done():
                    t.result()  # surface a failed assertion
            await asyncio.sleep(0.01)

    await wait_in_flight(written)
    await asyncio.sleep(0.3)  # let those writes land
    admin = aioredis.Redis.from_url(own_redis.url)
    await admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    await wait_in_flight(paused)
    await asyncio.sleep(0.3)  # the turns reach the gateway and block in Redis
    first.kill()
    await admin.execute_command("CLIENT", "UNPAUSE")
    await admin.aclose()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, Exception) for r in results)  # every connection dropped

    second = GatewayProcess(tmp_path / "second.log", *gateway_args)
    second.start()
    try:
        durable_in_flight = 0
        for c in callers:
            assert c.in_flight is not None
            turn_id, form = c.in_flight
            if c.in_flight_acked:
                # Acked before the kill: the re-send below must change nothing.
                c.version -= 1
            async with connect(url(second.port)) as ws:
                welcome = await hello(ws, c.caller, resume_token=c.token)
                assert welcome["resumed"] is True
                if c.in_flight_acked or welcome["version"] == c.version + 1:
                    # The write landed before the crash; at most its ack was lost.
                    assert c in written
                    durable_in_flight += 1
                    assert welcome["state"]["form_answers"] == {**c.acked, **form}
                else:
                    assert c in paused
                    assert welcome["version"] == c.version
                    assert welcome["state"]["form_answers"] == c.acked
                ack = await turn(ws, turn_id, form=form)
                assert ack == {"type": "ack", "turn_id": turn_id, "version": c.version + 1}
                # And once more, as a client unsure of its ack would.
                assert (await turn(ws, turn_id, form=form))["version"] == c.version + 1
            async with connect(url(second.port)) as ws:
                final = await hello(ws, c.caller, resume_token=c.token)
            assert final["version"] == c.version + 1
            assert final["state"]["form_answers"] == {**c.acked, **form}
        assert durable_in_flight == len(written)
    finally:
        assert await asyncio.to_thread(second.terminate) == 0


@pytest.mark.slow
async def test_sigterm_exits_zero(first: GatewayProcess) -> None:
    """SIGTERM closes clients with 1001 (going away) and the process exits 0."""
    async with connect(url(first.port)) as ws:
        await hello(ws, {"user_id": "u", "call_id": "term"})
        assert first.proc is not None
        first.proc.terminate()
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert await asyncio.to_thread(first.proc.wait, 10) == 0
