"""The relay between clients and a voice agent: the agent learns where the conversation
stood on every resume, and the client gets every agent message exactly once, in order."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
from typing import Any

import pytest

from gateway.config import Config
from gateway.store.base import StoreSettings
from gateway.transport.sessions import LiveSession
from tests.support.agents import TestAgent, booking, silent
from tests.support.gateways import RelayFactory
from tests.support.gwmetrics import sample
from tests.support.relayclient import Caller
from tests.support.wsclient import url

PHONE = {"phone": "+14155550100", "call_id": "call-relay"}
ANSWERS = [("name", "Alice"), ("date", "Friday"), ("reason", "a checkup"), ("confirm", "yes")]


async def test_drop_after_every_turn(relay: RelayFactory) -> None:
    """Dropped after each turn (before or after the agent's reply), the client resumes; each
    time the agent gets session.resume with the restored state and asks the next question,
    and every message arrives exactly once, in order."""
    async with relay(booking) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        first = await caller.connect()
        assert first["resumed"] is False
        await caller.asks("name")
        await voice.wait_for(lambda r: r[0]["type"] == "session.start")
        for n, (_, answer) in enumerate(ANSWERS):
            await caller.turn(f"t{n}", answer)
            if n % 2:
                await caller.asks(ANSWERS[n + 1][0] if n + 1 < len(ANSWERS) else None)
            caller.drop()
            welcome = await caller.connect()
            assert welcome["resumed"] is True and welcome["replay"] == "full"
            await voice.wait_for(lambda r: len(voice.of_type("session.resume")) == n + 1)  # noqa: B023
            resumes = voice.of_type("session.resume")
            assert resumes[-1]["reason"] == "client_resumed"
            assert resumes[-1]["state"] == welcome["state"]
            assert resumes[-1]["version"] == welcome["version"]
            expected = ANSWERS[n + 1][0] if n + 1 < len(ANSWERS) else None
            await caller.asks(expected)
        await caller.aclose()
    texts = [m["text"] for m in caller.messages]
    assert texts[-1] == "Welcome back. Your appointment is booked."
    assert any(t.startswith("Booked: Alice on Friday for a checkup") for t in texts)
    # The agent heard each turn once over its link, after it was durable.
    assert [t["text"] for t in voice.of_type("turn")] == [a for _, a in ANSWERS]
    assert [t["version"] for t in voice.of_type("turn")] == sorted(
        t["version"] for t in voice.of_type("turn")
    )


async def test_agent_output_while_client_away_is_replayed(relay: RelayFactory) -> None:
    """What the agent says while the client is gone is stored and replayed after last_seq,
    before anything new; the agent's state patch is in the welcome."""
    async with relay(silent) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        await voice.send({"type": "say", "n": 1})
        await caller.until(lambda f: f["type"] == "msg")
        caller.drop()
        await voice.send(
            {"type": "say", "n": 2},
            {"type": "state", "patch": {"form_answers": {"name": "Alice"}}},
            {"type": "say", "n": 3},
        )
        live = next(iter(gw.sessions.live.values()))
        while live.session is None or live.session.seq < 3:
            await asyncio.sleep(0.01)
        welcome = await caller.connect()
        assert welcome["seq"] == 3 and welcome["replay"] == "full"
        assert welcome["state"]["form_answers"] == {"name": "Alice"}
        await voice.wait_for(lambda r: r[-1]["type"] == "session.resume")
        await voice.send({"type": "say", "n": 4})
        await caller.until(lambda f: f["type"] == "msg" and f["data"]["n"] == 4)
        await caller.aclose()
    assert [m["n"] for m in caller.messages] == [1, 2, 3, 4]
    assert sample(gw, "hangon_relay_messages_total", how="replayed") == 2


async def test_window_overrun_is_partial(relay: RelayFactory, settings: StoreSettings) -> None:
    """When the client missed more than the replay window holds, the welcome says partial
    and where the replay starts, and the replay begins there."""
    async with relay(silent, settings=dataclasses.replace(settings, replay_window=3)) as (
        gw,
        voice,
    ):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        caller.drop()
        await voice.send(*({"type": "say", "n": n} for n in range(1, 11)))
        live = next(iter(gw.sessions.live.values()))
        while live.session is None or live.session.seq < 10:
            await asyncio.sleep(0.01)
        welcome = await caller.connect()
        assert (welcome["replay"], welcome["replay_from"], welcome["seq"]) == ("partial", 8, 10)
        await caller.until(lambda f: f["type"] == "msg" and f["seq"] == 10)
        await caller.aclose()
    assert [m["n"] for m in caller.messages] == [8, 9, 10]
    assert sample(gw, "hangon_relay_resumes_total", replay="partial") == 1
    assert sample(gw, "hangon_relay_messages_total", how="dropped") == 7  # 1 to 7, missed


async def test_acked_messages_leave_the_store(relay: RelayFactory) -> None:
    """Messages the client acknowledged are dropped from the replay list on the next write,
    so a client resuming without last_seq is told the replay is partial."""
    async with relay(silent) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        await voice.send({"type": "say", "n": 1}, {"type": "say", "n": 2})
        await caller.until(lambda f: f["type"] == "msg" and f["seq"] == 2)
        live = next(iter(gw.sessions.live.values()))
        while live.acked_seq < 2:
            await asyncio.sleep(0.01)
        await voice.send({"type": "say", "n": 3})
        await caller.until(lambda f: f["type"] == "msg" and f["seq"] == 3)
        await caller.aclose()
        forgetful = Caller(url(gw.port), PHONE)
        forgetful.token, forgetful.session_id = caller.token, caller.session_id
        welcome = await forgetful.connect()
        assert (welcome["replay"], welcome["replay_from"]) == ("partial", 3)
        await forgetful.aclose()


async def test_bad_agent_frames_are_rejected(relay: RelayFactory, config: Config) -> None:
    """Malformed frames and wrongly shaped patches are answered with an error frame, counted,
    and never reach the client or the stored state; the link stays up."""
    bad: list[str | bytes | dict[str, Any]] = [
        "{not json",
        b"\x00\x01 audio",
        "[1, 2]",
        {"no": "type"},
        {"type": "state"},
        {"type": "state", "patch": {}},
        {"type": "state", "patch": {"last_turn": {"turn_id": "forged"}}},
        {"type": "state", "patch": {"form_answers": "Alice"}},
        {"type": "state", "patch": {"context": {"deep": _nested(40)}}},
        {"type": "state", "patch": {"context": {"blob": "x" * 20_000}}},
        {"type": "say", "blob": "x" * 70_000},
    ]
    async with relay(silent, config=config.replace("limits", max_state_size=16_384)) as (
        gw,
        voice,
    ):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        await voice.send(*bad, {"type": "say", "ok": True})
        msg = await caller.until(lambda f: f["type"] == "msg")
        await voice.wait_for(lambda r: len(voice.of_type("error")) == len(bad))
        codes = [e["code"] for e in voice.of_type("error")]
        await caller.aclose()
        again = Caller(url(gw.port), PHONE)
        again.token, again.session_id, again.last_seq = caller.token, caller.session_id, 1
        welcome = await again.connect()
        await again.aclose()
    assert msg["seq"] == 1 and msg["data"] == {"type": "say", "ok": True}
    assert codes == [
        "invalid_json",
        "unsupported_data",
        "invalid_message",
        "invalid_message",
        "invalid_patch",
        "invalid_patch",
        "invalid_patch",
        "invalid_patch",
        "invalid_patch",
        "state_too_big",
        "message_too_big",
    ]
    assert welcome["version"] == 0 and welcome["seq"] == 1
    assert welcome["state"] == {"context": {}, "form_answers": {}, "last_turn": None}
    assert sample(gw, "hangon_agent_frames_rejected_total", code="invalid_patch") == 5
    assert sample(gw, "hangon_agent_connects_total", outcome="ok") == 1


def _nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


async def test_bye_ends_the_agent_session(relay: RelayFactory) -> None:
    """A turn reaches the agent once durable, with its version; bye sends session.end and
    closes the link."""
    async with relay(silent) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        await caller.turn("t1", "hello there")
        await voice.wait_for(lambda r: r[-1]["type"] == "turn")
        assert caller.ws is not None
        await caller.ws.send('{"type": "bye"}')
        await voice.wait_for(lambda r: r[-1]["type"] == "session.end")
        await voice.connections[0].wait_closed()
    kinds = [f["type"] for f in voice.received]
    assert kinds == ["session.start", "turn", "session.end"]
    assert voice.received[1]["version"] == 1 and voice.received[1]["text"] == "hello there"
    assert not gw.sessions.live


async def test_linger_ends_the_agent_link(relay: RelayFactory, config: Config) -> None:
    """A client that does not come back within the linger time releases the agent link."""
    async with relay(silent, config=config.replace("agent", agent_linger=0.2)) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        caller.drop()
        await asyncio.wait_for(voice.connections[0].wait_closed(), 5)
        assert not gw.sessions.live
        assert sample(gw, "hangon_agent_links_active") == 0


def held(kind: type) -> int:
    """Objects of ``kind`` still in memory, garbage included (the collector is off)."""
    return sum(type(o) is kind for o in gc.get_objects())


@pytest.mark.usefixtures("no_collector")
async def test_ended_session_freed_without_the_collector(
    relay: RelayFactory, config: Config
) -> None:
    """A session that lingered out, with its relay, is freed by reference counting: the
    cyclic collector, which the gateway runs rarely, is not needed (here, it is off)."""
    async with relay(silent, config=config.replace("agent", agent_linger=0.2)) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        (live,) = gw.sessions.live.values()
        assert live.relay is not None
        del live
        caller.drop()
        await asyncio.wait_for(voice.connections[0].wait_closed(), 5)
        for _ in range(100):
            if not held(LiveSession):
                break
            await asyncio.sleep(0.02)
        assert not held(LiveSession), "the dropped session waits for the cyclic collector"


async def test_drain_does_not_wait_on_lingering_sessions(relay: RelayFactory) -> None:
    """A deploy with only lingering sessions stops at once: the drain period spreads the
    clients' reconnects, and a lingering session has none; what its agent said while the
    client was away is persisted before the link closes."""
    async with relay(silent) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        caller.drop()
        (live,) = gw.sessions.live.values()
        while live.client is not None:
            await asyncio.sleep(0.01)
        await voice.send({"type": "say", "n": 1})
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(gw.sessions.drain(60), 10)
        took = loop.time() - started
        await asyncio.wait_for(voice.connections[0].wait_closed(), 5)
    assert took < 5, took
    assert live.session is not None and live.session.seq == 1


async def test_agent_unreachable_does_not_fail_the_session(
    relay: RelayFactory, config: Config
) -> None:
    """With the agent down the session still opens and turns are acked; once the agent is up
    the gateway's redial sends the state with the turns made meanwhile."""
    async with TestAgent(booking) as probe:
        port = probe.server.sockets[0].getsockname()[1] if probe.server else 0
    cfg = config.replace("agent", downstream=f"ws://127.0.0.1:{port}/", agent_retry_max_delay=0.2)
    async with relay.gateway(cfg) as gw:
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await caller.turn("t1", "Alice")
        while sample(gw, "hangon_agent_connects_total", outcome="error") < 2:
            await asyncio.sleep(0.02)
        voice = TestAgent(booking)
        from websockets.asyncio.server import serve

        voice.server = await serve(voice._handle, "127.0.0.1", port)
        try:
            await caller.asks("date")
            opening = voice.received[0]
        finally:
            await voice.__aexit__()
        await caller.aclose()
    assert opening["type"] == "session.start"
    assert opening["state"]["last_turn"]["text"] == "Alice"
