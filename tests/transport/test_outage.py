"""A store that is down, in-process: turns keep their order across nacks, a degraded
session hands over cleanly to a later hello, and bye waits for the real session."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from tests.support.gateways import GatewayFactory
from tests.support.stores import StoreFactory
from tests.support.storewrap import Outage
from tests.support.wsclient import closed, connect, hello, recv, send, turn, url

ADA = {"phone": "+14155550100", "call_id": "out-1"}


pytestmark = pytest.mark.stores("memory", "redis")


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, config: Config, settings: StoreSettings, make_store: StoreFactory
) -> AsyncIterator[Gateway]:
    cfg = config.replace("store", degrade_after=0.2, retry_budget=1.0)
    store = Outage(make_store(settings))
    async with make_gateway(cfg, store=store, delays=lambda: [0.05] * 3) as gw:
        yield gw


def outage(gw: Gateway) -> Outage:
    assert isinstance(gw.store, Outage)
    return gw.store


async def test_turns_after_a_nacked_one_wait_for_it(gateway: Gateway) -> None:
    """Once a turn is nacked, the turns sent after it are nacked too until it is acked, so
    they land in the order they were sent: a correction is never overwritten by what it
    corrected."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, ADA)
        outage(gateway).down = True
        await send(ws, {"type": "turn", "turn_id": "t1", "form": {"date": "mon"}})
        assert (await recv(ws))["type"] == "nack"
        outage(gateway).down = False
        await send(ws, {"type": "turn", "turn_id": "t2", "form": {"date": "tue"}})
        held = await recv(ws)
        assert (held["type"], held["turn_id"]) == ("nack", "t2")
        assert "'t1'" in held["message"]
        assert (await turn(ws, "t1", form={"date": "mon"}))["version"] == 1
        assert (await turn(ws, "t2", form={"date": "tue"}))["version"] == 2
    async with connect(url(gateway.port)) as ws:
        assert (await hello(ws, ADA))["state"]["form_answers"] == {"date": "tue"}


async def test_a_later_hello_releases_a_degraded_sessions_turns(gateway: Gateway) -> None:
    """A degraded session's connection is replaced by a later hello on this instance: the new
    connection's turns are acked at once, not held behind the degraded one's recovery."""
    outage(gateway).down = True
    async with connect(url(gateway.port)) as first:
        degraded = await hello(first, ADA)
        assert degraded["degraded"] is True and degraded["resume_token"] == ""
        outage(gateway).down = False
        async with connect(url(gateway.port)) as second:
            welcome = await hello(second, ADA)
            assert "degraded" not in welcome
            ack = await asyncio.wait_for(turn(second, "t1", form={"name": "Ada"}), 0.9)
            assert ack["version"] == 1
        result = await closed(first)
    assert result.error is not None and result.error["code"] == "session_replaced"


async def test_bye_on_a_degraded_session_ends_the_stored_session(gateway: Gateway) -> None:
    """A bye sent while the session is degraded waits for the store, then ends the session
    the store holds: a later hello for the caller finds it ended."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, ADA)
        await turn(ws, "t1", form={"name": "Ada"})
    outage(gateway).down = True
    async with connect(url(gateway.port)) as ws:
        assert (await hello(ws, ADA))["degraded"] is True
        await send(ws, {"type": "bye"})
        await asyncio.sleep(0.1)
        outage(gateway).down = False
        real = await recv(ws)
        assert (real["type"], real["resumed"], real["version"]) == ("welcome", True, 1)
        assert (await closed(ws)).code == 1000
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "hello", "caller": ADA})
        assert (await closed(ws)).code == 4502
