"""Races around the relay, each found by a review and fixed: lost store replies, a takeover
racing a drop, abandoned hellos, and client positions beyond what is stored."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gateway.config import Config
from gateway.exceptions import StoreTimeout
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from tests.support.agents import TestAgent, silent
from tests.support.gateways import GatewayFactory, RelayFactory
from tests.support.relayclient import Caller
from tests.support.stores import StoreFactory
from tests.support.storewrap import Deaf, SlowFirstRestore, Wrapper
from tests.support.wsclient import connect, hello, send, turn, url

PHONE = {"phone": "+14155550100", "call_id": "call-relay"}


class LostPushReply(Wrapper):
    """Delegates to a real store. While ``lose`` is set, the next push lands and then
    raises StoreTimeout (its reply was lost); while ``down`` is set, pushes raise
    StoreTimeout without landing (the store is unreachable)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.lose = False
        self.down = False
        self.landed = asyncio.Event()

    async def push(self, *args: Any, **kwargs: Any) -> None:
        if self.lose:
            self.lose = False
            await self.inner.push(*args, **kwargs)
            self.landed.set()
            raise StoreTimeout("push", "reply lost")
        if self.down:
            raise StoreTimeout("push", "store down")
        await self.inner.push(*args, **kwargs)


async def _push_reply_lost(gw: Gateway, voice: TestAgent, store: LostPushReply) -> Caller:
    """Connect a caller, then have the agent say n=1: stored, but its reply lost."""
    caller = Caller(url(gw.port), PHONE)
    await caller.connect()
    await voice.wait_for(lambda r: len(r) == 1)
    store.lose = store.down = True
    await voice.send({"type": "say", "n": 1})
    await asyncio.wait_for(store.landed.wait(), 5)
    return caller


async def _frames_until(caller: Caller, n: int, timeout: float) -> list[dict[str, Any]]:
    """Read until the msg with data n == ``n`` or an error; return what was read."""
    seen: list[dict[str, Any]] = []
    assert caller.ws is not None
    async with asyncio.timeout(timeout):
        while True:
            frame = json.loads(await caller.ws.recv())
            seen.append(frame)
            if frame["type"] == "error" or (frame["type"] == "msg" and frame["data"]["n"] == n):
                return seen


async def test_takeover_racing_linger0_detach_keeps_relaying(
    relay: RelayFactory, config: Config, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """With --agent-linger 0, an old connection that drops while a new hello for its session
    is restoring does not drop the session under it: the new client stays registered and
    hears the agent."""
    store = SlowFirstRestore(make_store(settings), slow=2)
    linger0 = config.replace("agent", agent_linger=0)
    async with relay(silent, config=linger0, store=store) as (gw, voice):
        first = Caller(url(gw.port), PHONE)
        await first.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        second = Caller(url(gw.port), PHONE)
        second.token, second.session_id = first.token, first.session_id
        opening = asyncio.create_task(second.connect())
        while store.first:
            await asyncio.sleep(0.01)  # the second hello holds the lock, in restore
        first.drop()
        while gw.metrics.registry.get_sample_value("hangon_connection_active") != 1:
            await asyncio.sleep(0.01)  # the old connection's handler has finished
        store.release.set()
        await opening
        await voice.wait_for(lambda r: r[-1]["type"] == "session.resume")
        registered = bool(gw.sessions.live)
        await voice.send({"type": "say", "n": 1})
        try:
            frames = await _frames_until(second, 1, 3)
        except TimeoutError:
            frames = []
        await second.aclose()
    msgs = [f["data"]["n"] for f in frames if f["type"] == "msg"]
    assert (registered, msgs) == (True, [1])


async def test_lost_push_reply_then_more_frames_loses_nothing(
    relay: RelayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A push that landed but whose reply was lost is retried unchanged (and recognised by
    its push ID) while more agent frames queue behind it: nothing is lost or refused."""
    store = LostPushReply(make_store(settings))
    async with relay(silent, store=store) as (gw, voice):
        caller = await _push_reply_lost(gw, voice, store)
        await voice.send({"type": "say", "n": 2})
        await asyncio.sleep(0.3)  # the pump retries, its batch now holds both frames
        store.down = False
        frames = await _frames_until(caller, 2, 5)
        await caller.aclose()
        caller.ws = None
        caller.last_seq = 0
        welcome = await caller.connect()  # what is stored now, replayed from 1
        await caller.aclose()
    errors = [f["code"] for f in frames if f["type"] == "error"]
    assert (errors, welcome["seq"]) == ([], 2)


async def test_lost_push_reply_then_resume_does_not_duplicate(
    relay: RelayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A push that landed but whose reply was lost, followed by a resume that replays it, is
    not written a second time under a new seq."""
    store = LostPushReply(make_store(settings))
    async with relay(silent, store=store) as (gw, voice):
        caller = await _push_reply_lost(gw, voice, store)
        caller.drop()
        welcome = await caller.connect()  # replays seq 1
        store.down = False
        await voice.send({"type": "say", "n": 2})
        await caller.until(lambda f: f["type"] == "msg" and f["data"]["n"] == 2)
        await caller.aclose()
    assert welcome["seq"] == 1
    assert [m["n"] for m in caller.messages] == [1, 2]


async def test_hello_last_seq_beyond_seq_is_not_an_ack_of_future_messages(
    relay: RelayFactory,
) -> None:
    """A hello whose last_seq is beyond the stored seq gets a partial replay but does not
    count as an ack of messages not yet written: they stay for the next resume."""
    async with relay(silent) as (gw, voice):
        first = Caller(url(gw.port), PHONE, ack=False)
        await first.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        first.drop()
        caller = Caller(url(gw.port), PHONE, ack=False)
        caller.token, caller.session_id, caller.last_seq = first.token, first.session_id, 100
        welcome = await caller.connect()
        assert (welcome["replay"], welcome["replay_from"]) == ("partial", 1)
        await voice.wait_for(lambda r: r[-1]["type"] == "session.resume")
        live = next(iter(gw.sessions.live.values()))
        await voice.send({"type": "say", "n": 1})
        await caller.until(lambda f: f["type"] == "msg" and f["seq"] == 1)
        await voice.send({"type": "say", "n": 2})
        while live.session is None or live.session.seq < 2:
            await asyncio.sleep(0.01)
        await voice.send({"type": "say", "n": 3})
        while live.session.seq < 3:
            await asyncio.sleep(0.01)
        caller.drop()  # msgs 2 and 3 never read: last_seq is 1, nothing acked
        again = await caller.connect()
        await caller.aclose()
    assert again["replay"] == "full", again


async def test_abandoned_hello_does_not_unfence_a_superseded_connection(
    make_gateway: GatewayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A connection superseded from another instance (whose notice was lost) stays fenced
    when a hello abandoned on its own instance starts yet another epoch: its turn is refused
    and never stored."""
    inner = make_store(settings)
    slow = SlowFirstRestore(Deaf(inner), slow=2)
    async with (
        make_gateway(store=slow) as a,
        make_gateway(store=inner) as b,
    ):
        async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
            welcome = await hello(on_a, PHONE)
            token = welcome["resume_token"]
            assert (await hello(on_b, PHONE, resume_token=token))["resumed"] is True
            async with connect(url(a.port)) as abandoned:
                await send(abandoned, {"type": "hello", "caller": PHONE, "resume_token": token})
                while slow.first:
                    await asyncio.sleep(0.01)
            assert a.server is not None
            while len(a.server.connections) != 1:
                await asyncio.sleep(0.01)
            slow.release.set()
            superseded = await turn(on_a, "t-old", form={"who": "superseded"})
        async with connect(url(b.port)) as again:
            restored = await hello(again, PHONE, resume_token=token)
    assert superseded["type"] == "error" and superseded["code"] == "session_conflict", superseded
    assert restored["state"]["form_answers"] == {}


class LostTurnReply(Wrapper):
    """Delegates to a real store; while ``lose`` is set, the next write_turn lands and then
    it and its retries raise StoreTimeout (the reply was lost, then the store hiccupped)."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.lose = False
        self.landed = False

    async def write_turn(self, *args: Any, **kwargs: Any) -> Any:
        if self.lose:
            if not self.landed:
                self.landed = True
                await self.inner.write_turn(*args, **kwargs)
            raise StoreTimeout("write_turn", "reply lost")
        return await self.inner.write_turn(*args, **kwargs)


async def test_patch_after_lost_turn_reply_keeps_the_acked_turn(
    relay: RelayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A turn that landed though its client was nacked (store_unavailable), whose client then
    dropped, leaves the lingering copy behind the store: the agent's next patch is refused as
    a conflict (its link closes) instead of overwriting the turn, and the client's resend is
    acked as already applied."""
    store = LostTurnReply(make_store(settings))
    async with relay(silent, store=store) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        live = next(iter(gw.sessions.live.values()))
        store.lose = True
        assert caller.ws is not None
        await caller.ws.send(json.dumps({"type": "turn", "turn_id": "t1", "form": {"name": "Ada"}}))
        err = await caller.until(lambda f: f["type"] == "nack")
        assert err["code"] == "store_unavailable"
        caller.drop()
        store.lose = False
        await voice.send({"type": "state", "patch": {"context": {"agent": 1}}})
        await asyncio.wait_for(voice.connections[0].wait_closed(), 5)
        assert live.gone
        welcome = await caller.connect()
        ack = await caller.turn("t1", "resent")  # the client resends what was not acked
        await caller.aclose()
    assert ack == {"type": "ack", "turn_id": "t1", "version": 1}
    assert welcome["state"]["form_answers"] == {"name": "Ada"}, welcome["state"]
    assert welcome["state"]["context"] == {}


async def test_turn_resent_after_a_lost_reply_on_the_same_connection_is_applied_once(
    relay: RelayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A turn nacked because its write's reply was lost (it landed), sent again on the same
    connection, is recognised as that very write: acked as applied, not twice, and the
    session goes on (the agent's next patch lands on top of it)."""
    store = LostTurnReply(make_store(settings))
    async with relay(silent, store=store) as (gw, voice):
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        store.lose = True
        assert caller.ws is not None
        await caller.ws.send(json.dumps({"type": "turn", "turn_id": "t1", "form": {"name": "Ada"}}))
        nack = await caller.until(lambda f: f["type"] == "nack")
        store.lose = False
        ack = await caller.turn("t1", "resent")
        await voice.send({"type": "state", "patch": {"context": {"agent": 1}}})
        state = await caller.until(lambda f: f["type"] == "state")
        await caller.aclose()
    assert nack["turn_id"] == "t1"
    assert ack == {"type": "ack", "turn_id": "t1", "version": 1}
    assert state["version"] == 2
    assert state["state"]["form_answers"] == {"name": "Ada"}
    assert state["state"]["context"] == {"agent": 1}
    applied = gw.metrics.registry.get_sample_value(
        "hangon_session_turns_total", {"outcome": "applied"}
    )
    assert applied == 1
