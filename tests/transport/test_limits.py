"""Limits on a live gateway: turns per second per connection, connections per tenant and the
upgrade and hello deadlines. Each breach gets its error frame (or reset), close code and metric,
and nobody else notices."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from tests.support.gateways import GatewayFactory
from tests.support.gwmetrics import errors
from tests.support.stores import StoreFactory
from tests.support.wsclient import closed, connect, hello, recv, send, turn, url

ADA = {"phone": "+14155550100", "call_id": "lim-1"}


pytestmark = pytest.mark.stores("memory")


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, config: Config, settings: StoreSettings, make_store: StoreFactory
) -> AsyncIterator[Gateway]:
    cfg = config.replace(
        "limits",
        max_turns_per_second=2.0,
        turn_burst=3,
        max_tenant_connections=2,
        hello_timeout=0.3,
        handshake_timeout=0.3,
        metrics_tenants=2,
    )
    async with make_gateway(cfg, store=make_store(settings), metrics=Metrics(tenants=2)) as gw:
        yield gw


def tenant_gauge(gw: Gateway, tenant: str) -> float:
    value = gw.metrics.registry.get_sample_value("hangon_tenant_sessions", {"tenant": tenant})
    return value or 0.0


async def test_turns_past_the_rate_close_with_4008_and_resume_cleanly(gateway: Gateway) -> None:
    """A burst past --turn-burst gets rate_limited (4008, reconnect, retry_after); after the
    hint the client resumes, re-sends the refused turn and it is applied once."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, ADA)
        for n in range(1, 5):
            await send(ws, {"type": "turn", "turn_id": f"t{n}", "form": {"n": n}})
        acks = [await recv(ws) for _ in range(3)]
        result = await closed(ws)
    assert [a["version"] for a in acks] == [1, 2, 3]
    assert result.expect(4008, "rate_limited", reconnect=True)["retry_after"] >= 1.0
    assert errors(gateway, "rate_limited") == 1
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, ADA)
        assert welcome["version"] == 3
        assert (await turn(ws, "t4", form={"n": 4}))["version"] == 4
        assert (await turn(ws, "t4", form={"n": 4}))["version"] == 4  # a re-send: no-op


async def test_a_tenant_past_its_connections_gets_1013_others_do_not(gateway: Gateway) -> None:
    """The third acme connection is refused with tenant_limit (1013, retry_after); globex is
    not affected; a slot freed by a close is free again. Metrics bound tenant labels."""
    acme = [{"user_id": f"u{n}", "call_id": "c", "tenant": "acme"} for n in range(4)]
    async with connect(url(gateway.port)) as a, connect(url(gateway.port)) as b:
        await hello(a, acme[0])
        await hello(b, acme[1])
        assert tenant_gauge(gateway, "acme") == 2
        async with connect(url(gateway.port)) as c:
            await send(c, {"type": "hello", "caller": acme[2]})
            result = await closed(c)
        assert result.expect(1013, "tenant_limit")["retry_after"] == 5.0
        async with connect(url(gateway.port)) as g:
            assert (await hello(g, {"user_id": "g", "call_id": "c", "tenant": "globex"}))[
                "type"
            ] == "welcome"
            async with connect(url(gateway.port)) as x:
                await hello(x, {"user_id": "x", "call_id": "c", "tenant": "initech"})
                assert tenant_gauge(gateway, "other") == 1  # a third tenant name
    for _ in range(100):
        if tenant_gauge(gateway, "acme") == 0:
            break
        await asyncio.sleep(0.01)
    assert tenant_gauge(gateway, "acme") == 0 and tenant_gauge(gateway, "other") == 0
    assert errors(gateway, "tenant_limit") == 1
    async with connect(url(gateway.port)) as d:
        assert (await hello(d, acme[3]))["type"] == "welcome"


async def test_a_connection_without_hello_is_closed_after_the_deadline(gateway: Gateway) -> None:
    """A connection that says nothing (or only pings) gets hello_timeout and close 4002."""
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "ping"})
        assert (await recv(ws))["type"] == "pong"
        result = await closed(ws, timeout=3)
    result.expect(4002, "hello_timeout", reconnect=True)
    assert errors(gateway, "hello_timeout") == 1
    async with connect(url(gateway.port)) as ws:  # a prompt hello is unaffected
        await hello(ws, ADA)
        await asyncio.sleep(0.5)
        assert (await turn(ws, "late", form={"ok": True}))["type"] == "ack"


async def test_an_upgrade_left_unfinished_is_reset_after_the_deadline(gateway: Gateway) -> None:
    """A TCP connection that never finishes its upgrade request is reset once
    --handshake-timeout passes; one that finished it is not (the test above keeps one
    open past it, before and after its hello)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n")
        await writer.drain()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with asyncio.timeout(3):
                assert await reader.read() == b""  # no answer, then the end of the stream
        except ConnectionResetError:
            pass
        assert 0.25 <= loop.time() - started < 3
    finally:
        writer.close()
    assert gateway.metrics.registry.get_sample_value("hangon_upgrade_timeouts_total") == 1
