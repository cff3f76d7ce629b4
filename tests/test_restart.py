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

from tests.support.gateway_process import GatewayProcess
from tests.support.httpget import get
from tests.support.redis_server import RedisServer
from tests.support.wsclient import connect, hello, recv, send, turn, url

SESSIONS = 30


@pytest.fixture(params=["redis", "cluster"])
def backend(request: pytest.FixtureRequest) -> tuple[str, list[str]]:
    """A durable Redis of this test's own, or a three-primary Redis Cluster: the URL for
    the gateway and one URL per primary, to pause them."""
    if request.param == "redis":
        own: RedisServer = request.getfixturevalue("own_redis")
        return own.url, [own.url]
    cluster = request.getfixturevalue("own_redis_cluster")
    return cluster.url, [f"redis://127.0.0.1:{port}/0" for port in cluster.ports]


@pytest.fixture
def gateway_args(backend: tuple[str, list[str]]) -> list[str]:
    return ["--redis-url", backend[0], "--downstream", "off"]


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
    first: GatewayProcess,
    tmp_path: Path,
    gateway_args: list[str],
    backend: tuple[str, list[str]],
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
    admins = [aioredis.Redis.from_url(primary) for primary in backend[1]]
    for admin in admins:
        await admin.execute_command("CLIENT", "PAUSE", "10000", "WRITE")
    await wait_in_flight(paused)
    await asyncio.sleep(0.3)  # the turns reach the gateway and block in Redis
    first.kill()
    for admin in admins:
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
async def test_sigterm_drains_with_1012_spread_over_the_period(
    tmp_path: Path, gateway_args: list[str]
) -> None:
    """SIGTERM fails /readyz and refuses new upgrades with 503 at once, keeps serving turns,
    closes every client with 1012 at moments spread over the drain period, keeps every acked
    turn, and exits 0."""
    gw = GatewayProcess(tmp_path / "drain.log", *gateway_args, "--drain-period", "2")
    gw.start()
    assert gw.proc is not None
    callers = [{"user_id": f"u{i}", "call_id": "drain"} for i in range(20)]
    sockets = [await connect(url(gw.port)).__aenter__() for _ in callers]
    acked = [1] * len(callers)
    try:
        for ws, caller in zip(sockets, callers, strict=True):
            await hello(ws, caller)
            assert (await turn(ws, "t1", form={"n": 1}))["version"] == 1
        assert (await get(gw.port, "/readyz"))[0] == 200
        loop = asyncio.get_running_loop()
        started = loop.time()
        gw.proc.terminate()
        status = 200
        while status == 200 and loop.time() - started < 1:
            status = (await get(gw.port, "/readyz"))[0]
        assert status == 503
        refused, _, headers = await get(gw.port, "/ws")
        assert refused == 503 and headers["retry-after"] == "1"

        async def until_closed(ws: Any, i: int) -> tuple[float, int | None]:
            # Turns still apply while the drain has not reached this session.
            n = 2
            try:
                while True:
                    ack = await turn(ws, f"t{n}", form={"n": n})
                    assert ack["version"] == n, ack
                    acked[i] = n
                    n += 1
                    await asyncio.sleep(0.05)
            except ConnectionClosed as exc:
                return loop.time() - started, exc.rcvd.code if exc.rcvd else None

        closes = await asyncio.gather(*(until_closed(ws, i) for i, ws in enumerate(sockets)))
        assert await asyncio.to_thread(gw.proc.wait, 15) == 0
    finally:
        for ws in sockets:
            await ws.close()
        if gw.proc.poll() is None:
            gw.kill()
    assert {code for _, code in closes} == {1012}
    moments = sorted(t for t, _ in closes)
    # Spread, not all at once: the drain period is 2 s.
    assert moments[-1] - moments[0] > 0.8, moments
    assert moments[-1] < 2 + 5, moments
    again = GatewayProcess(tmp_path / "again.log", *gateway_args)
    again.start()
    try:
        for caller, last in zip(callers, acked, strict=True):
            async with connect(url(again.port)) as ws:
                restored = await hello(ws, caller)
            assert restored["state"]["form_answers"]["n"] == last
            assert restored["version"] == last
    finally:
        assert await asyncio.to_thread(again.terminate) == 0
