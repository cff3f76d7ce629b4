"""Redis goes away for real (SIGKILL) and comes back: retries hide short outages, long
ones fail cleanly with a retryable close, and no acknowledged turn is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.client import Client, Restored
from gateway.config import Config
from gateway.server import Gateway
from tests.support.gateways import GatewayFactory
from tests.support.httpget import get
from tests.support.redis_server import RedisServer
from tests.support.wsclient import connect, hello, recv, send, turn, url

CALLER = {"user_id": "u-outage", "call_id": "c-1"}
# About 3.5 s of retries: longer than a Redis restart, short enough for a test.
DELAYS = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, own_redis: RedisServer, config: Config
) -> AsyncIterator[Gateway]:
    cfg = config.replace(
        "store", redis_url=own_redis.url, redis_timeout=0.5, redis_connect_timeout=0.5
    )
    async with make_gateway(cfg, delays=lambda: DELAYS) as gw:
        yield gw


def store_errors(gw: Gateway, op: str) -> float:
    registry = gw.metrics.registry
    return sum(
        registry.get_sample_value("hangon_store_errors_total", {"op": op, "kind": kind}) or 0
        for kind in ("unavailable", "timeout")
    )


def turns(gw: Gateway, outcome: str) -> float:
    value = gw.metrics.registry.get_sample_value("hangon_session_turns_total", {"outcome": outcome})
    return value or 0.0


async def restart_later(redis: RedisServer, delay: float) -> None:
    await asyncio.sleep(delay)
    await asyncio.to_thread(redis.start)


async def test_turn_survives_short_outage(gateway: Gateway, own_redis: RedisServer) -> None:
    """A turn sent while Redis restarts is retried and acked once Redis is back, and kept."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, CALLER)
        await turn(ws, "t1", form={"name": "Ada"})
        own_redis.kill()
        restart = asyncio.create_task(restart_later(own_redis, 0.5))
        ack = await turn(ws, "t2", form={"date": "mon"})
        await restart
    assert ack == {"type": "ack", "turn_id": "t2", "version": 2}
    assert store_errors(gateway, "write_turn") >= 1
    own_redis.kill()  # the acked turns are on disk (appendfsync always)
    own_redis.start()
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, CALLER, resume_token=welcome["resume_token"])
    assert again["version"] == 2
    assert again["state"]["form_answers"] == {"name": "Ada", "date": "mon"}


async def test_hello_survives_short_outage(gateway: Gateway, own_redis: RedisServer) -> None:
    """A session start while Redis restarts is retried, not failed."""
    own_redis.kill()
    restart = asyncio.create_task(restart_later(own_redis, 0.5))
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, CALLER)
    await restart
    assert welcome["type"] == "welcome"
    assert store_errors(gateway, "restore") >= 1


async def test_long_outage_nacks_the_turn_and_keeps_the_connection(
    gateway: Gateway, own_redis: RedisServer
) -> None:
    """When retries run out, the turn is not acked but nacked (store_unavailable, with
    retry_after) and the connection stays open; once Redis is back, the re-sent turn is
    applied once, on the same connection."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, CALLER)
        await turn(ws, "t1", form={"name": "Ada"})
        own_redis.kill()
        await send(ws, {"type": "turn", "turn_id": "t2", "form": {"date": "mon"}})
        nack = await recv(ws, timeout=15)
        assert nack["type"] == "nack" and nack["turn_id"] == "t2"
        assert nack["code"] == "store_unavailable" and 1.0 <= nack["retry_after"] <= 3.0
        own_redis.start()
        assert (await turn(ws, "t2", form={"date": "mon"}))["version"] == 2
        assert (await turn(ws, "t2", form={"date": "mon"}))["version"] == 2
    assert turns(gateway, "nacked") == 1 and turns(gateway, "applied") == 2


async def test_readyz_follows_redis(gateway: Gateway, own_redis: RedisServer) -> None:
    """/readyz is 200 with Redis up, 503 with it down, 200 again once it is back."""
    assert (await get(gateway.port, "/readyz"))[0] == 200
    own_redis.kill()
    status, body, _ = await get(gateway.port, "/readyz")
    assert status == 503
    assert b"store unavailable" in body
    assert store_errors(gateway, "ping") == 1
    assert (await get(gateway.port, "/healthz"))[0] == 200
    own_redis.start()
    assert (await get(gateway.port, "/readyz"))[0] == 200


async def test_ten_seconds_without_redis(
    make_gateway: GatewayFactory, own_redis: RedisServer, config: Config, tmp_path: Path
) -> None:
    """Redis is killed for ten seconds mid-conversation (append-only file on). The live
    session stays connected, its turn is nacked and re-sent until Redis is back, then acked;
    a session started meanwhile opens degraded instead of failing, and is persisted once
    Redis is back. Afterwards, with Redis killed and restarted once more, every acked turn
    is there, and none was applied twice."""
    cfg = config.replace(
        "store",
        redis_url=own_redis.url,
        redis_timeout=0.5,
        redis_connect_timeout=0.5,
        retry_budget=2.0,
        degrade_after=1.0,
    )
    async with make_gateway(cfg, delays=lambda: DELAYS) as gw:
        seen: dict[str, list[Restored]] = {"a": [], "b": []}
        a = Client(
            url(gw.port),
            {"user_id": "a", "call_id": "c"},
            max_delay=1.0,
            on_restored=seen["a"].append,
        )
        b = Client(
            url(gw.port),
            {"user_id": "b", "call_id": "c"},
            max_delay=1.0,
            on_restored=seen["b"].append,
        )
        runs = [asyncio.create_task(a.run())]
        await asyncio.wait_for(a.connected.wait(), 5)
        acked = [await a.turn(f"a{n}", form={f"q{n}": n}) for n in range(1, 4)]
        assert acked == [1, 2, 3]
        own_redis.kill()
        down = asyncio.get_running_loop().time()
        during = asyncio.create_task(a.turn("a4", form={"q4": 4}))
        runs.append(asyncio.create_task(b.run()))
        await asyncio.wait_for(b.connected.wait(), 5)
        assert [r.degraded for r in seen["b"]] == [True]
        started = asyncio.create_task(b.turn("b1", form={"name": "Bea"}))
        await asyncio.sleep(10 - (asyncio.get_running_loop().time() - down))
        assert not during.done() and not started.done()  # acked only once durable
        assert a.connects == 1 and a.connected.is_set()  # never dropped
        own_redis.start()
        assert await asyncio.wait_for(during, 15) == 4
        assert await asyncio.wait_for(started, 15) == 1
        assert [r.degraded for r in seen["b"]] == [True, False]
        assert a.connects == 1
        assert turns(gw, "nacked") >= 2
        assert turns(gw, "applied") == 5
        for client in (a, b):
            await client.aclose()
        await asyncio.gather(*runs)
        own_redis.kill()
        own_redis.start()
        async with connect(url(gw.port)) as ws:
            back_a = await hello(ws, {"user_id": "a", "call_id": "c"})
        async with connect(url(gw.port)) as ws:
            back_b = await hello(ws, {"user_id": "b", "call_id": "c"})
    assert back_a["version"] == 4
    assert back_a["state"]["form_answers"] == {"q1": 1, "q2": 2, "q3": 3, "q4": 4}
    assert (back_b["version"], back_b["state"]["form_answers"]) == (1, {"name": "Bea"})
