"""Two gateway instances on one Redis, instance A deaf to takeover notices (as when pub/sub
lost them): a connection superseded by a newer hello elsewhere still cannot overwrite newer
state; the epoch check refuses it, it is told to resume and then sees everything."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.server import Gateway, open_store
from tests.support.agents import TestAgent
from tests.support.gateways import GatewayFactory
from tests.support.relayclient import Caller
from tests.support.storewrap import Deaf
from tests.support.wsclient import closed, connect, hello, send, turn, url

CALLER = {"user_id": "u-two", "call_id": "c-1"}


pytestmark = pytest.mark.stores("redis")


@pytest.fixture
async def pair(
    make_gateway: GatewayFactory, store_config: Config
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Instances A (deaf) and B on one Redis."""
    deaf = Deaf(open_store(store_config))
    async with make_gateway(store_config, store=deaf) as a, make_gateway(store_config) as b:
        yield a, b


async def test_superseded_connection_cannot_write(pair: tuple[Gateway, Gateway]) -> None:
    """A hello through instance B fences the connection on instance A: A's next turn is
    refused with 4003 and not stored, B's turns apply, and A's client resumes to see them."""
    a, b = pair
    async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
        welcome = await hello(on_a, CALLER)
        assert (await turn(on_a, "t1", form={"name": "Ada"}))["version"] == 1
        again = await hello(on_b, CALLER, resume_token=welcome["resume_token"])
        assert again["session_id"] == welcome["session_id"] and again["version"] == 1
        await send(on_a, {"type": "turn", "turn_id": "t2", "form": {"name": "Bob"}})
        result = await closed(on_a)
        assert (await turn(on_b, "t3", form={"date": "Friday"}))["version"] == 2
    result.expect(4003, "session_conflict", reconnect=True)
    async with connect(url(a.port)) as on_a:
        back = await hello(on_a, CALLER, resume_token=welcome["resume_token"])
    assert back["version"] == 2
    assert back["state"]["form_answers"] == {"name": "Ada", "date": "Friday"}


async def test_lingering_agent_link_elsewhere_cannot_write(
    make_gateway: GatewayFactory, store_config: Config
) -> None:
    """A client that moved to instance B fences the agent link still lingering on A: what
    the agent says there is refused, not stored or relayed, and A closes that link."""
    async with TestAgent() as voice:
        cfg = store_config.replace("agent", downstream=voice.url)
        deaf = Deaf(open_store(cfg))
        async with make_gateway(cfg, store=deaf) as a, make_gateway(cfg) as b:
            caller = Caller(url(a.port), CALLER)
            await caller.connect()
            await voice.wait_for(lambda r: len(r) == 1)
            caller.drop()
            caller.url = url(b.port)
            await caller.connect()
            await voice.wait_for(lambda r: len(r) == 2)
            on_a, on_b = voice.connections
            await on_a.send('{"type": "say", "from": "a"}')
            await asyncio.wait_for(on_a.wait_closed(), 5)
            await on_b.send('{"type": "say", "from": "b"}')
            msg = await caller.until(lambda f: f["type"] == "msg")
            await caller.aclose()
            assert not a.sessions.live
    assert msg == {"type": "msg", "seq": 1, "data": {"type": "say", "from": "b"}}
    assert [f["type"] for f in voice.received] == ["session.start", "session.resume"]


async def test_superseded_bye_does_not_end_the_session(pair: tuple[Gateway, Gateway]) -> None:
    """A bye from a connection that a newer hello elsewhere superseded is refused with 4003;
    the session goes on for the newer connection."""
    a, b = pair
    async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
        welcome = await hello(on_a, CALLER)
        await hello(on_b, CALLER, resume_token=welcome["resume_token"])
        await send(on_a, {"type": "bye"})
        result = await closed(on_a)
        ack = await turn(on_b, "t1", form={"name": "Ada"})
    assert result.code == 4003
    assert ack == {"type": "ack", "turn_id": "t1", "version": 1}
