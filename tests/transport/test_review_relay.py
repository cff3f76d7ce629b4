"""Review reproductions for the relay (7f74139..6cebc72). Each test states the guarantee
it checks; a failure here is a bug in gateway/, not in the test."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from gateway.exceptions import StoreTimeout
from gateway.metrics import Metrics
from gateway.server import Gateway
from gateway.config import Config
from gateway.store.base import StoreSettings
from tests.agents import TestAgent, silent
from tests.conftest import Clock, StoreFactory
from tests.relayclient import Caller
from tests.transport.test_relay import PHONE, relay
from tests.transport.test_takeover import SlowFirstRestore
from tests.wsclient import url


class LostPushReply:
    """Delegates to a real store. While ``lose`` is set, the next push lands and then
    raises StoreTimeout (its reply was lost); while ``down`` is set, pushes raise
    StoreTimeout without landing (the store is unreachable)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.lose = False
        self.down = False
        self.landed = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def push(self, *args: Any, **kwargs: Any) -> None:
        if self.lose:
            self.lose = False
            await self.inner.push(*args, **kwargs)
            self.landed.set()
            raise StoreTimeout("push", "reply lost")
        if self.down:
            raise StoreTimeout("push", "store down")
        await self.inner.push(*args, **kwargs)


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
    config: Config, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> None:
    """Guarantee 1/4. With --agent-linger 0, the old connection's _detach calls _drop
    without the session lock while the new connection's hello is inside its restore.
    _open then attaches to the dropped (gone) LiveSession: the new pump returns on the
    first agent frame (`if live.gone`), so the client never hears the agent again, and
    the session is missing from ctx.live (shutdown's aclose cannot see it)."""
    async with TestAgent(silent) as voice:
        cfg = config.replace("agent", downstream=voice.url, agent_linger=0)
        store = SlowFirstRestore(make_store(settings), slow=2)
        async with Gateway(cfg, store=store, metrics=Metrics(), clock=clock) as gw:
            first = Caller(url(gw.port), PHONE)
            await first.connect()
            await voice.wait_for(lambda r: len(r) == 1)
            second = Caller(url(gw.port), PHONE)
            second.token, second.session_id = first.token, first.session_id
            opening = asyncio.create_task(second.connect())
            while store.first:
                await asyncio.sleep(0.01)  # the second hello holds the lock, in restore
            first.drop()
            async with asyncio.timeout(5):
                while gw.context.live:
                    await asyncio.sleep(0.01)  # the old connection's _detach dropped it
            store.release.set()
            await opening
            await voice.wait_for(lambda r: r[-1]["type"] == "session.resume")
            registered = bool(gw.context.live)
            await voice.send({"type": "say", "n": 1})
            try:
                frames = await _frames_until(second, 1, 3)
            except TimeoutError:
                frames = []
            await second.aclose()
    msgs = [f["data"]["n"] for f in frames if f["type"] == "msg"]
    assert (registered, msgs) == (True, [1])


async def test_lost_push_reply_then_more_frames_loses_nothing(
    config: Config, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> None:
    """Guarantees 1/3. A push lands but its reply is lost and the retries fail (store
    hiccup); the pump keeps `pending` and, on each retry, adds what arrived meanwhile. The
    bigger push no longer matches push.lua's idempotency check: it is a conflict, the
    client gets session_conflict and the frames that arrived meanwhile are lost."""
    holder: dict[str, LostPushReply] = {}

    def flaky(s: StoreSettings) -> Any:
        holder["s"] = LostPushReply(make_store(s))
        return holder["s"]

    async with relay(config, settings, flaky, clock, silent) as (gw, voice):
        store = holder["s"]
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        store.lose = store.down = True
        await voice.send({"type": "say", "n": 1})
        await asyncio.wait_for(store.landed.wait(), 5)
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
    config: Config, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> None:
    """Guarantee 1. A push lands, its reply is lost and the retries fail; the client
    resumes meanwhile and gets the message in the replay. The pump then pushes the same
    frames again on top of the restored seq: the client gets the message twice, under
    two seqs (so no client-side dedupe can catch it)."""
    holder: dict[str, LostPushReply] = {}

    def flaky(s: StoreSettings) -> Any:
        holder["s"] = LostPushReply(make_store(s))
        return holder["s"]

    async with relay(config, settings, flaky, clock, silent) as (gw, voice):
        store = holder["s"]
        caller = Caller(url(gw.port), PHONE)
        await caller.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        store.lose = store.down = True
        await voice.send({"type": "say", "n": 1})
        await asyncio.wait_for(store.landed.wait(), 5)
        caller.drop()
        welcome = await caller.connect()  # replays seq 1
        store.down = False
        await voice.send({"type": "say", "n": 2})
        await caller.until(lambda f: f["type"] == "msg" and f["data"]["n"] == 2)
        await caller.aclose()
    assert welcome["seq"] == 1
    assert [m["n"] for m in caller.messages] == [1, 2]


async def test_hello_last_seq_beyond_seq_is_not_an_ack_of_future_messages(
    config: Config, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> None:
    """Guarantee 1. A resuming hello whose last_seq is above the stored seq (documented:
    a Redis that lost writes) gets a partial replay from seq + 1, as it should, but
    _open keeps max(acked_seq, last_seq) uncapped, so every later push trims messages
    the client never acknowledged, and a later resume with an honest last_seq loses
    one without cause."""
    async with relay(config, settings, make_store, clock, silent) as (gw, voice):
        first = Caller(url(gw.port), PHONE, ack=False)
        await first.connect()
        await voice.wait_for(lambda r: len(r) == 1)
        first.drop()
        caller = Caller(url(gw.port), PHONE, ack=False)
        caller.token, caller.session_id, caller.last_seq = first.token, first.session_id, 100
        welcome = await caller.connect()
        assert (welcome["replay"], welcome["replay_from"]) == ("partial", 1)
        await voice.wait_for(lambda r: r[-1]["type"] == "session.resume")
        live = next(iter(gw.context.live.values()))
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
