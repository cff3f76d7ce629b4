"""Redis goes away for real (SIGKILL) and comes back: retries hide short outages, long
ones fail cleanly with a retryable close, and no acknowledged turn is lost."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.server import Gateway
from tests.httpget import get
from tests.redis_server import RedisServer
from tests.wsclient import closed, connect, hello, send, turn, url

CALLER = {"user_id": "u-outage", "call_id": "c-1"}
# About 3.5 s of retries: longer than a Redis restart, short enough for a test.
DELAYS = [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0]


@pytest.fixture
async def gateway(own_redis: RedisServer, config: Config) -> AsyncIterator[Gateway]:
    cfg = config.replace(
        "store", redis_url=own_redis.url, redis_timeout=0.5, redis_connect_timeout=0.5
    )
    async with Gateway(cfg, metrics=Metrics(), delays=lambda: DELAYS) as gw:
        yield gw


def store_errors(gw: Gateway, op: str) -> float:
    registry = gw.metrics.registry
    return sum(
        registry.get_sample_value("hangon_store_errors_total", {"op": op, "kind": kind}) or 0
        for kind in ("unavailable", "timeout")
    )


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


async def test_long_outage_closes_with_4001_then_resumes(
    gateway: Gateway, own_redis: RedisServer
) -> None:
    """When retries run out, the turn is not acked: store_unavailable, close 4001; after
    Redis returns, the client resumes and its re-sent turn is applied once."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, CALLER)
        await turn(ws, "t1", form={"name": "Ada"})
        own_redis.kill()
        await send(ws, {"type": "turn", "turn_id": "t2", "form": {"date": "mon"}})
        result = await closed(ws, timeout=15)
    assert result.code == 4001
    assert result.error is not None and result.error["code"] == "store_unavailable"
    assert result.error["reconnect"] is True
    own_redis.start()
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, CALLER, resume_token=welcome["resume_token"])
        assert again["version"] == 1
        assert (await turn(ws, "t2", form={"date": "mon"}))["version"] == 2
        assert (await turn(ws, "t2", form={"date": "mon"}))["version"] == 2


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
