"""gateway.agent behind a real gateway: events, the state, missed turns, and the call's end."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server

from gateway import agent
from gateway.agent import Call, End, Event, Rejected, Resume, Start, Turn
from gateway.config import Config
from gateway.server import Gateway
from tests.support.gateways import GatewayFactory
from tests.support.wsclient import hello, recv, send, turn, url

CALLER = {"user_id": "u-agent", "call_id": "c-1"}


class Recorder:
    """A handler that records every event and answers each turn as ``answer`` says."""

    def __init__(self, answer: str = "patch") -> None:
        self.answer = answer
        self.calls: list[list[Event]] = []
        self.changed = asyncio.Event()

    async def __call__(self, call: Call) -> None:
        events: list[Event] = []
        self.calls.append(events)
        async for event in call:
            events.append(event)
            self.changed.set()
            if isinstance(event, Start | Resume) and event.missed is None:
                await call.say("hello", version=call.version)
            elif isinstance(event, Turn):
                if self.answer == "patch":
                    await call.patch(form_answers={"said": event.text})
                elif self.answer == "bad":
                    await call.send({"type": "state", "patch": {"last_turn": 1}})
                elif self.answer == "fail":
                    raise RuntimeError("a bug in the bot")
                await call.say(f"heard {event.text}")

    async def wait(self, predicate: Any, timeout: float = 5) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                self.changed.clear()
                await self.changed.wait()

    def ended(self, n: int) -> bool:
        """Whether the ``n``-th call has had its End."""
        return len(self.calls) > n and bool(self.calls[n]) and isinstance(self.calls[n][-1], End)

    def kinds(self, n: int = -1) -> list[str]:
        return [type(e).__name__ for e in self.calls[n]]


@asynccontextmanager
async def behind(
    make_gateway: GatewayFactory, config: Config, handler: Recorder, **agent_settings: float
) -> AsyncIterator[tuple[Gateway, Server]]:
    """A gateway whose agent is ``handler``, served by gateway.agent."""
    server = await agent.serve(handler)
    port = server.sockets[0].getsockname()[1]
    cfg = config.replace("agent", downstream=f"ws://127.0.0.1:{port}/", **agent_settings)
    try:
        async with make_gateway(cfg) as gw:
            yield gw, server
    finally:
        server.close()
        await server.wait_closed()


async def test_a_call_starts_takes_turns_and_marks_them_answered(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A new session is a Start with the caller and state; a turn comes as a Turn, and the
    answer's patch names the turn it answered in context.agent_turn."""
    bot = Recorder()
    async with behind(make_gateway, config, bot) as (gw, _), connect(url(gw.port)) as ws:
        assert (await hello(ws, CALLER))["type"] == "welcome"
        assert (await recv(ws))["data"]["text"] == "hello"
        frames = [await turn(ws, "t1", text="Ada")] + [await recv(ws) for _ in range(2)]
        assert [f["type"] for f in frames] == ["ack", "state", "msg"]  # sent in this order
        assert frames[1]["state"]["form_answers"] == {"said": "Ada"}
        assert frames[1]["state"]["context"] == {"agent_turn": "t1"}
        assert frames[2]["data"] == {"type": "say", "text": "heard Ada"}
    assert bot.kinds(0)[:2] == ["Start", "Turn"]
    start, first = bot.calls[0][0], bot.calls[0][1]
    assert start == Start(missed=None)
    assert isinstance(first, Turn) and (first.text, first.missed) == ("Ada", False)


async def test_a_turn_answered_without_a_patch_is_marked_for_it(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A handler that only speaks still leaves its turn marked answered, so that a resume
    does not hand the turn over again."""
    bot = Recorder(answer="say")
    async with behind(make_gateway, config, bot) as (gw, _), connect(url(gw.port)) as ws:
        await hello(ws, CALLER)
        await recv(ws)
        frames = [await turn(ws, "t1", text="Ada")] + [await recv(ws) for _ in range(2)]
        # One batch or two: a batch's state frame comes first (docs/protocol.md).
        assert sorted(f["type"] for f in frames) == ["ack", "msg", "state"]
        state = next(f for f in frames if f["type"] == "state")
        assert state["state"]["context"] == {"agent_turn": "t1"}
        assert state["state"]["form_answers"] == {}


async def test_receive_does_no_chore_and_answered_names_the_turn(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A handler on receive() (a framework answering later) leaves its turns unanswered
    until a patch names one with answered=; moving on to the next event marks nothing."""
    turns: list[Turn] = []

    async def later(call: Call) -> None:
        while not isinstance(event := await call.receive(), End):
            if isinstance(event, Turn):
                turns.append(event)
                if len(turns) == 2:  # answers both at once, naming the last
                    await call.patch(context={"n": 2}, answered=event.turn_id)

    server = await agent.serve(later)
    port = server.sockets[0].getsockname()[1]
    cfg = config.replace("agent", downstream=f"ws://127.0.0.1:{port}/")
    try:
        async with make_gateway(cfg) as gw, connect(url(gw.port)) as ws:
            await hello(ws, CALLER)
            assert (await turn(ws, "t1", text="one"))["type"] == "ack"
            assert (await turn(ws, "t2", text="two"))["type"] == "ack"
            state = await recv(ws)
    finally:
        server.close()
        await server.wait_closed()
    assert [t.turn_id for t in turns] == ["t1", "t2"]
    assert state["type"] == "state"
    assert state["state"]["context"] == {"n": 2, "agent_turn": "t2"}  # never t1 alone


async def test_a_turn_made_while_the_agent_was_away_is_answered_once(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A turn acked while no link was up comes after the Resume as a missed Turn, and the
    Resume says so (no greeting); once answered, a later resume does not repeat it."""
    bot = Recorder()
    server = await agent.serve(bot)
    port = server.sockets[0].getsockname()[1]
    cfg = config.replace("agent", downstream=f"ws://127.0.0.1:{port}/", agent_linger=0.0)
    async with make_gateway(cfg) as gw:
        async with connect(url(gw.port)) as ws:
            welcome = await hello(ws, CALLER)
            await recv(ws)
            server.close()  # the agent goes away; the link redials in vain
            await server.wait_closed()
            await bot.wait(lambda: bot.ended(0))
            assert (await turn(ws, "t1", text="Ada"))["type"] == "ack"
        server = await agent.serve(bot, port=port)  # back, on the same port
        try:
            async with connect(url(gw.port)) as ws:
                await hello(ws, CALLER, resume_token=welcome["resume_token"], last_seq=1)
                frames = [await recv(ws) for _ in range(2)]
                assert frames[0]["state"]["form_answers"] == {"said": "Ada"}
                assert frames[1]["data"] == {"type": "say", "text": "heard Ada"}
            await bot.wait(lambda: bot.ended(1))
            resumed = bot.calls[1]
            assert isinstance(resumed[0], Resume) and resumed[0].missed is not None
            assert isinstance(resumed[1], Turn) and resumed[1].missed
            assert resumed[1].text == "Ada"
            async with connect(url(gw.port)) as ws:
                await hello(ws, CALLER, resume_token=welcome["resume_token"], last_seq=3)
                assert (await recv(ws))["data"]["text"] == "hello"
            await bot.wait(lambda: len(bot.calls) == 3)
            assert not any(isinstance(e, Turn) for e in bot.calls[2])
        finally:
            server.close()
            await server.wait_closed()


async def test_bye_ends_the_call_and_a_drop_only_sends_the_client_away(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """session.end ends the iteration with End(over=True); a link closed without it (the
    client dropped, linger 0) with End(over=False)."""
    bot = Recorder()
    async with behind(make_gateway, config, bot, agent_linger=0.0) as (gw, _):
        async with connect(url(gw.port)) as ws:
            await hello(ws, CALLER)
            await recv(ws)
        await bot.wait(lambda: bot.ended(0))
        assert bot.calls[0][-1] == End(over=False)
        async with connect(url(gw.port)) as ws:
            await hello(ws, {"user_id": "u-bye", "call_id": "c-2"})
            await recv(ws)
            await send(ws, {"type": "bye"})
            await ws.wait_closed()
        await bot.wait(lambda: bot.ended(1))
        assert bot.calls[1][-1] == End(over=True)


async def test_a_refused_frame_is_an_event_and_a_failing_handler_is_logged(
    make_gateway: GatewayFactory, config: Config, caplog: pytest.LogCaptureFixture
) -> None:
    """A frame hangon refuses comes back as Rejected; a handler that raises is logged once
    with its session, and its link closes (the gateway redials with session.resume)."""
    bot = Recorder(answer="bad")
    async with behind(make_gateway, config, bot) as (gw, _), connect(url(gw.port)) as ws:
        await hello(ws, CALLER)
        await recv(ws)
        await turn(ws, "t1", text="Ada")
        await bot.wait(lambda: any(isinstance(e, Rejected) for e in bot.calls[0]))
    rejected = next(e for e in bot.calls[0] if isinstance(e, Rejected))
    assert rejected.code == "invalid_patch"

    failing = Recorder(answer="fail")
    with caplog.at_level(logging.ERROR, logger="gateway.agent"):
        async with behind(make_gateway, config, failing) as (gw, _), connect(url(gw.port)) as ws:
            await hello(ws, CALLER)
            await recv(ws)
            await turn(ws, "t2", text="Bob")
            await failing.wait(lambda: len(failing.calls) >= 2)
    assert isinstance(failing.calls[1][0], Resume)
    assert failing.calls[1][0].reason == "agent_reconnected"
    assert any(
        r.getMessage().startswith("agent handler failed session=s_") and r.exc_info
        for r in caplog.records
    )


async def test_frames_of_the_wrong_shape_are_skipped_not_fatal() -> None:
    """The link is a peer like any other: frames that are not JSON, nest too deep, carry
    fields of the wrong type or bad audio are skipped or read with defaults, and the call
    goes on to its End."""
    bot = Recorder()
    server = await agent.serve(bot, send_timeout=1)
    port = server.sockets[0].getsockname()[1]
    try:
        async with connect(f"ws://127.0.0.1:{port}/") as link:
            await link.send("{not json")
            await link.send("[" * 100_000)
            await link.send('["a list"]')
            await link.send(
                '{"type":"session.start","session_id":"s_1","caller":["x"],'
                '"state":"nope","version":"v","stream":7}'
            )
            await link.send('{"type":"media","payload":"***","chunk":"1"}')
            await link.send('{"type":"media","payload":"AAAA","chunk":"9999999999999999999999"}')
            await link.send('{"type":"turn","turn_id":"t1","version":true,"text":5}')
            await link.send('{"type":"session.end","session_id":"s_1"}')
            await bot.wait(lambda: bot.ended(0))
            await link.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    kinds = bot.kinds(0)
    assert kinds == ["Start", "Media", "Turn", "End"]
    media, said = bot.calls[0][1], bot.calls[0][2]
    assert media == agent.Media(b"\x00\x00\x00", None, None, None)
    assert isinstance(said, Turn) and (said.text, said.version) == (None, 0)
