"""Out-of-range, deep and oversized values in every field of every frame type: each is
refused where it enters, before it reaches a store script, the codec or another frame.
The caller's live connection, the bystander and the store are left as they were."""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config import Config
from gateway.server import Gateway
from gateway.store.base import SessionStore, StoreSettings, bad_argument
from gateway.store.memory_store import MemoryStore
from gateway.store.redis_store import RedisStore
from tests.support.agents import TestAgent
from tests.support.gateways import GatewayFactory
from tests.support.peers import Bystander
from tests.support.stores import StoreFactory
from tests.support.storewrap import Wrapper
from tests.support.wsclient import closed, connect, hello, recv, send, turn, url

CALLER = {"phone": "+14155550100", "call_id": "live"}
DEEP = json.loads("[" * 300 + "]" * 300)
DEEP_OBJECT = json.loads('{"a":' * 300 + "1" + "}" * 300)


# Redis: where a half-written script would show. The memory store is refused the same
# values by the same edge checks (tests/core) and store checks (tests/store).
pytestmark = pytest.mark.stores("redis")


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, settings: StoreSettings, make_store: StoreFactory
) -> AsyncIterator[Gateway]:
    async with make_gateway(store=make_store(settings)) as gw:
        yield gw


async def snapshot(store: SessionStore, prefix: str) -> object:
    """Everything the store holds: every key of the test's prefix byte for byte in Redis,
    a deep copy of the records in memory."""
    if isinstance(store, RedisStore):
        client = store.client
        keys = [key async for key in client.scan_iter(match=prefix + "*")]
        return {key: await client.dump(key) for key in sorted(keys)}
    assert isinstance(store, MemoryStore)
    return copy.deepcopy(store._records)


HELLOS = [
    {"last_seq": 2**53},
    {"last_seq": 2**62},
    {"last_seq": 2**63 - 1},
    {"last_seq": -(2**63)},
    {"last_seq": 1.5},
    {"last_seq": "7"},
    {"last_seq": DEEP},
    {"resume_token": DEEP},
    {"resume_token": "r" * 300},
    {"resume_token": 2**62},
    {"token": DEEP_OBJECT},
    {"caller": DEEP_OBJECT},
    {"caller": {**CALLER, "call_id": DEEP}},
    {"caller": {**CALLER, "phone": "9" * 400}},
    {"tenant": DEEP},
    {"tenant": "t" * 400},
]


@pytest.mark.parametrize("fields", HELLOS, ids=range(len(HELLOS)))
async def test_a_bad_hello_changes_nothing(
    gateway: Gateway, settings: StoreSettings, fields: dict[str, Any]
) -> None:
    """A hello for a live caller with a value out of range, too deep or too long is refused
    with an error frame and a close before any store call: the store is byte for byte as
    it was, and the caller's live connection goes on (its next turn is not fenced off)."""
    async with Bystander(gateway.port) as bystander, connect(url(gateway.port)) as live:
        welcome = await hello(live, CALLER)
        assert (await turn(live, "t1", form={"name": "Ada"}))["version"] == 1
        before = await snapshot(gateway.store, settings.key_prefix)
        async with connect(url(gateway.port)) as bad:
            message = {"type": "hello", "caller": CALLER, "resume_token": "x", **fields}
            await send(bad, message)
            result = await closed(bad)
        assert result.error is not None
        assert result.error["code"] in ("invalid_message", "invalid_caller")
        assert result.code in (1007, 1008)
        assert await snapshot(gateway.store, settings.key_prefix) == before
        assert (await turn(live, "t2", form={"date": "Friday"}))["version"] == 2
        await bystander.check()
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, CALLER, resume_token=welcome["resume_token"])
    assert again["state"]["form_answers"] == {"name": "Ada", "date": "Friday"}


TURNS = [
    {"turn_id": "t" * 129},
    {"turn_id": DEEP},
    {"turn_id": 2**62},
    {"turn_id": "t2", "text": DEEP},
    {"turn_id": "t2", "text": 2**62},
    {"turn_id": "t2", "form": DEEP_OBJECT},
    {"turn_id": "t2", "form": {"a": DEEP}},
    {"turn_id": "t2", "context": DEEP_OBJECT},
    {"turn_id": "t2", "form": []},
]
ACKS: list[Any] = [2**53, 2**64, -1, DEEP, 1e308]


@pytest.mark.parametrize(
    "message",
    [{"type": "turn", **t} for t in TURNS] + [{"type": "ack", "seq": s} for s in ACKS],
    ids=range(len(TURNS) + len(ACKS)),
)
async def test_a_bad_turn_or_ack_changes_nothing(
    gateway: Gateway, settings: StoreSettings, message: dict[str, Any]
) -> None:
    """A turn or ack with a value out of range, too deep or of the wrong type closes its
    own connection with an error frame; its session is exactly as it was."""
    async with Bystander(gateway.port) as bystander:
        async with connect(url(gateway.port)) as ws:
            welcome = await hello(ws, CALLER)
            assert (await turn(ws, "t1", form={"name": "Ada"}))["version"] == 1
            before = await snapshot(gateway.store, settings.key_prefix)
            await send(ws, message)
            result = await closed(ws)
        result.expect(1007, "invalid_message")
        assert await snapshot(gateway.store, settings.key_prefix) == before
        async with connect(url(gateway.port)) as ws:
            again = await hello(ws, CALLER, resume_token=welcome["resume_token"])
        assert (again["version"], again["state"]["form_answers"]) == (1, {"name": "Ada"})
        await bystander.check()


def start(**fields: Any) -> dict[str, Any]:
    body = {
        "accountSid": "AC" + "3" * 32,
        "streamSid": "MZ" + "2" * 32,
        "callSid": "CA" + "1" * 32,
        "tracks": ["inbound"],
        "customParameters": {"From": "+14155550100"},
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        **fields,
    }
    return {"event": "start", "sequenceNumber": "1", "start": body}


STARTS = [
    {"customParameters": {"From": "+14155550100", "x": DEEP}},
    {"customParameters": {"From": "+14155550100", "x": DEEP_OBJECT}},
    {"customParameters": {"From": "+14155550100", **{f"p{i}": "v" for i in range(40)}}},
    {"customParameters": {"From": "+14155550100", "x": "v" * 5_000}},
    {"tracks": DEEP},
    {"tracks": ["inbound"] * 50},
    {"mediaFormat": {"encoding": DEEP_OBJECT}},
    {"mediaFormat": {"sampleRate": 2**62}},
    {"accountSid": DEEP_OBJECT},
    {"callSid": DEEP},
    {"streamSid": 2**62},
]


@pytest.mark.parametrize("fields", STARTS, ids=range(len(STARTS)))
async def test_a_bad_twilio_start_reaches_no_agent(
    make_gateway: GatewayFactory, config: Config, fields: dict[str, Any]
) -> None:
    """A Twilio start whose pass-through fields are deep, long or out of range closes the
    stream with 1007 before any agent link is dialled: the agent hears nothing and no link
    is left counted."""
    async with TestAgent() as agent:
        cfg = config.replace("agent", downstream=agent.url)
        async with make_gateway(cfg) as gw, Bystander(gw.port) as bystander:
            async with connect(url(gw.port, "/v1/twilio")) as ws:
                await send(ws, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
                await send(ws, start(**fields))
                result = await closed(ws)
            assert result.code == 1007
            await asyncio.sleep(0.2)
            assert [f for f in agent.of_type("session.start") if "stream" in f] == []
            assert gw.metrics.agent_links_active._value.get() == 1  # the bystander's
            await bystander.check()


AGENT_FRAMES: list[str | bytes] = [
    json.dumps({"type": "say", "deep": DEEP}),
    json.dumps({"type": "state", "patch": {"context": {"deep": DEEP}}}),
    json.dumps({"type": "state", "patch": {"form_answers": DEEP}}),
    json.dumps({"type": "state", "patch": {"session_id": {"a": 1}}}),
    json.dumps({"type": "state", "patch": {"context": {"big": "b" * 60_000}}}),
    '{"type": "say", "n": NaN}',
    '{"type": "say", "n": Infinity}',
    json.dumps({"type": DEEP}),
    json.dumps({"type": "say", "text": "x" * 70_000}),
    b"\x00" * 100,
]


@pytest.mark.parametrize("frame", AGENT_FRAMES, ids=range(len(AGENT_FRAMES)))
async def test_a_bad_agent_frame_reaches_nobody(
    make_gateway: GatewayFactory, config: Config, frame: str | bytes
) -> None:
    """An agent frame that is deep, too big, not JSON or out of range is rejected with an
    error frame to the agent: the client never sees it, the link stays, and the agent's
    next good message arrives as msg 1."""
    async with TestAgent() as agent:
        cfg = config.replace("agent", downstream=agent.url).replace("limits", max_state_size=32_768)
        async with make_gateway(cfg) as gw, Bystander(gw.port) as bystander:
            async with connect(url(gw.port)) as ws:
                await hello(ws, CALLER)
                await agent.wait_for(lambda got: len(got) >= 2)  # bystander's and ours
                links = len(agent.connections)
                await agent.send(frame)
                await agent.wait_for(lambda got: any(f["type"] == "error" for f in got))
                await agent.send({"type": "say", "text": "fine"})
                assert await recv(ws) == {
                    "type": "msg",
                    "seq": 1,
                    "data": {"type": "say", "text": "fine"},
                }
                assert len(agent.connections) == links
            await bystander.check()


class RefusingPushes(Wrapper):
    """Delegates to a real store, but refuses every push as a bad argument, as a script
    would refuse one out of range."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.pushes = 0

    async def push(self, *args: Any, **kwargs: Any) -> None:
        self.pushes += 1
        raise bad_argument("push", "base_seq")


async def test_agent_output_the_store_refuses_is_not_retried(
    make_gateway: GatewayFactory, config: Config, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """Agent output that the store refuses outright (a bad argument) is not retried for
    ever: the client gets store_unavailable, 4001, once, and resumes what the store holds."""
    store = RefusingPushes(make_store(settings))
    async with TestAgent() as agent:
        cfg = config.replace("agent", downstream=agent.url)
        async with make_gateway(cfg, store=store) as gw:  # type: ignore[arg-type]
            async with connect(url(gw.port)) as ws:
                welcome = await hello(ws, CALLER)
                assert (await turn(ws, "t1", form={"name": "Ada"}))["version"] == 1
                await agent.wait_for(lambda got: len(got) > 0)  # the link is up
                await agent.send({"type": "say", "text": "hello"})
                result = await closed(ws)
            result.expect(4001, "store_unavailable")
            await asyncio.sleep(0.5)
            assert store.pushes == 1
            async with connect(url(gw.port)) as ws:
                again = await hello(ws, CALLER, resume_token=welcome["resume_token"])
            assert (again["version"], again["seq"]) == (1, 0)


STREAM = "MZ" + "2" * 32
TWILIO_FRAMES = [
    {"event": "media", "media": {"track": "inbound", "chunk": "9" * 19, "timestamp": "1"}},
    {"event": "media", "media": {"track": DEEP, "chunk": "1", "timestamp": "1", "payload": "AA=="}},
    {"event": "media", "media": {"track": "inbound", "chunk": 2**62, "timestamp": "1"}},
    {"event": "media", "media": DEEP_OBJECT},
    {"event": "dtmf", "sequenceNumber": "1", "dtmf": {"digit": DEEP}},
    {"event": "dtmf", "sequenceNumber": "9" * 40, "dtmf": {"digit": "1"}},
    {"event": "mark", "mark": {"name": "m" * 300}},
    {"event": "mark", "mark": DEEP},
]


@pytest.mark.parametrize("frame", TWILIO_FRAMES, ids=range(len(TWILIO_FRAMES)))
async def test_a_bad_twilio_frame_changes_nothing(
    gateway: Gateway, settings: StoreSettings, frame: dict[str, Any]
) -> None:
    """A media, dtmf or mark frame with a value out of range, too deep or too long closes
    its stream with 1007; the call's session is byte for byte as it was."""
    async with Bystander(gateway.port) as bystander:
        async with connect(url(gateway.port, "/v1/twilio")) as ws:
            await send(ws, {"event": "connected", "protocol": "Call", "version": "1.0.0"})
            await send(ws, start())
            await asyncio.sleep(0.2)  # the session is open
            before = await snapshot(gateway.store, settings.key_prefix)
            await send(ws, {**frame, "streamSid": STREAM})
            result = await closed(ws)
        assert result.code == 1007
        assert await snapshot(gateway.store, settings.key_prefix) == before
        await bystander.check()
