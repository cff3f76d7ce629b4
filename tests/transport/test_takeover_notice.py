"""Takeover across instances on one Redis: the instance that lost a session is told (pub/sub)
and closes its client with 4500 and its agent link; its late writes are refused by the epoch
check; of two simultaneous hellos on two instances, one wins and the other is told why."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed

from gateway.config import Config
from gateway.core.callerkey import parse_caller
from gateway.core.session import Session, empty_state, new_resume_token, new_session_id
from gateway.exceptions import StoreConflict
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from gateway.store.redis_store import RedisStore
from tests.support.agents import TestAgent
from tests.support.clock import Clock
from tests.support.gateways import GatewayFactory
from tests.support.records import write
from tests.support.relayclient import Caller
from tests.support.stores import TEST_KEYRING
from tests.support.stores import stored as stored_session
from tests.support.storewrap import Wrapper
from tests.support.wsclient import closed, connect, hello, recv, send, turn, url

CALLER = {"user_id": "u-notice", "call_id": "c-1"}


pytestmark = pytest.mark.stores("redis")


@pytest.fixture
async def pair(
    make_gateway: GatewayFactory, store_config: Config
) -> AsyncIterator[tuple[Gateway, Gateway]]:
    """Instances A and B on one Redis."""
    async with make_gateway(store_config) as a, make_gateway(store_config) as b:
        yield a, b


async def stored(cfg: Config, caller: dict[str, Any]) -> dict[bytes, bytes]:
    """The session hash as the Redis that ``cfg`` names holds it, its sealed state opened."""
    assert cfg.store.redis_url is not None
    return await stored_session(cfg.store.redis_url, caller, cfg.store.key_prefix)


async def test_takeover_closes_the_old_client_and_fences_its_writes(
    pair: tuple[Gateway, Gateway], store_config: Config
) -> None:
    """A hello through B while A's socket is still open: A's client gets session_replaced and
    4500 without writing anything, A forgets the session, and a late write with A's epoch is
    refused: Redis holds B's state, epoch and ownership."""
    a, b = pair
    async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
        welcome = await hello(on_a, CALLER)
        assert (await turn(on_a, "t1", form={"name": "Ada"}))["version"] == 1
        (live_a,) = a.sessions.live.values()
        assert live_a.session is not None
        old = live_a.session
        held = await stored(store_config, CALLER)
        assert held[b"owner"] == a.instance.encode()
        await hello(on_b, CALLER, resume_token=welcome["resume_token"])
        result = await closed(on_a)
        assert (await turn(on_b, "t2", form={"date": "Friday"}))["version"] == 2
        assert not a.sessions.live
        late = write(old, "t-late", old.updated_ms + 1, name="Late")
        with pytest.raises(StoreConflict, match="newer connection"):
            await a.store.write_turn(parse_caller(CALLER), old.session_id, late)
        held = await stored(store_config, CALLER)
    result.expect(4500, "session_replaced", reconnect=False)
    assert held[b"owner"] == b.instance.encode()
    assert int(held[b"epoch"]) == old.epoch + 1
    assert held[b"ver"] == b"2"
    assert b"Late" not in held[b"state"] and b"Friday" in held[b"state"]
    assert a.metrics.takeovers.labels("lost")._value.get() == 1
    assert b.metrics.takeovers.labels("remote")._value.get() == 1


async def test_takeover_closes_the_old_agent_link(
    make_gateway: GatewayFactory, store_config: Config
) -> None:
    """The agent link of the instance that lost the session is closed by the notice; what
    the agent says on the new link reaches the client once."""
    async with TestAgent() as voice:
        cfg = store_config.replace("agent", downstream=voice.url)
        async with make_gateway(cfg) as a, make_gateway(cfg) as b:
            first = Caller(url(a.port), CALLER)
            await first.connect()
            await voice.wait_for(lambda r: len(r) == 1)
            second = Caller(url(b.port), CALLER)
            second.token = first.token
            await second.connect()
            await voice.wait_for(lambda r: len(r) == 2)
            on_a, on_b = voice.connections
            await asyncio.wait_for(on_a.wait_closed(), 5)
            await on_b.send('{"type": "say", "from": "b"}')
            msg = await second.until(lambda f: f["type"] == "msg")
            await second.aclose()
            first.drop()
            assert not a.sessions.live
    assert msg == {"type": "msg", "seq": 1, "data": {"type": "say", "from": "b"}}


async def test_notice_before_the_restore_reply_loses_the_race(
    make_gateway: GatewayFactory, store_config: Config
) -> None:
    """A's restore runs first in Redis but its reply is late; B's restore displaces A, and
    the notice reaches A before A's reply: A refuses its own hello with session_replaced
    rather than welcome a client onto a session B now holds."""
    async with make_gateway(store_config) as b:
        slow = _ReplyLate(b.store)
        async with make_gateway(store_config, store=slow) as a:
            async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
                await send(on_a, {"type": "hello", "caller": CALLER})
                while not slow.landed:
                    await asyncio.sleep(0.01)
                won = await hello(on_b, CALLER)
                while not a.sessions.fenced:
                    await asyncio.sleep(0.01)
                slow.release.set()
                lost = await closed(on_a)
                ack = await turn(on_b, "t1", form={"name": "Bea"})
    assert won["type"] == "welcome"
    lost.expect(4500, "session_replaced")
    assert ack["version"] == 1


class _ReplyLate(Wrapper):
    """Delegates to a real store; runs the first restore at once but returns its reply only
    on release."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.landed = False
        self.release = asyncio.Event()

    async def restore(self, *args: Any, **kwargs: Any) -> Any:
        reply = await self.inner.restore(*args, **kwargs)
        if not self.landed:
            self.landed = True
            await self.release.wait()
        return reply


async def test_simultaneous_hellos_on_two_instances_one_winner(
    pair: tuple[Gateway, Gateway],
) -> None:
    """Two hellos for one new caller sent at once to A and B, twenty times over: each time
    both name the same session, exactly one connection keeps it (its turn is acked) and the
    other is closed with session_replaced (4500)."""
    a, b = pair
    for i in range(20):
        caller = {"user_id": f"u-race-{i}", "call_id": "c-race"}
        async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
            await asyncio.gather(
                send(on_a, {"type": "hello", "caller": caller}),
                send(on_b, {"type": "hello", "caller": caller}),
            )
            outcomes = await asyncio.gather(_settle(on_a), _settle(on_b))
        welcomes = {o["session_id"] for o in outcomes if o.get("session_id")}
        winners = [o for o in outcomes if o["kept"]]
        losers = [o for o in outcomes if not o["kept"]]
        assert len(welcomes) == 1, outcomes
        assert len(winners) == 1 and len(losers) == 1, outcomes
        assert losers[0]["code"] == 4500 and losers[0]["error"] == "session_replaced", outcomes


async def _settle(ws: Any) -> dict[str, Any]:
    """Read the hello's answer, then try a turn: kept if acked, else how it was closed."""
    first = await recv(ws)
    out: dict[str, Any] = {"session_id": first.get("session_id"), "kept": False, "error": None}
    if first["type"] == "error":
        out["error"] = first["code"]
        out["code"] = (await closed(ws)).code
        return out
    await asyncio.sleep(0.3)  # let a takeover notice arrive
    try:
        await send(ws, {"type": "turn", "turn_id": "t1", "form": {"x": "1"}})
    except ConnectionClosed:
        pass
    reply = await recv(ws)
    if reply["type"] == "ack":
        out["kept"] = True
        return out
    out["error"] = reply["code"]
    out["code"] = (await closed(ws)).code
    return out


async def test_drained_session_is_released(
    pair: tuple[Gateway, Gateway], store_config: Config
) -> None:
    """A session drained from A (1012) is released: resuming it on B displaces nobody, so
    no takeover notice is sent, and B owns it."""
    a, b = pair
    async with connect(url(a.port)) as on_a:
        welcome = await hello(on_a, CALLER)
        await a.sessions.drain(0)
        result = await closed(on_a)
    while (await stored(store_config, CALLER))[b"owner"] != b"":
        await asyncio.sleep(0.01)
    async with connect(url(b.port)) as on_b:
        again = await hello(on_b, CALLER, resume_token=welcome["resume_token"])
        held = await stored(store_config, CALLER)
    assert result.code == 1012
    assert again["resumed"] is True
    assert held[b"owner"] == b.instance.encode()
    assert b.metrics.takeovers.labels("remote")._value.get() == 0


async def test_lost_notice_is_caught_by_the_renewal(
    make_gateway: GatewayFactory, store_config: Config
) -> None:
    """Another instance restores the session and its notice never comes: the next renewal
    finds the epoch moved on, closes the client with session_conflict (4003, reconnect) and
    stops, renewal task included."""
    cfg = store_config.replace("store", owner_lease=0.3)  # renewals every 0.1 s
    assert cfg.store.redis_url is not None
    async with make_gateway(cfg) as a:
        async with connect(url(a.port)) as ws:
            welcome = await hello(ws, CALLER)
            (live,) = a.sessions.live.values()
            assert live.renewal is not None
            other = RedisStore(
                cfg.store.redis_url,
                StoreSettings(key_prefix=cfg.store.key_prefix, keyring=TEST_KEYRING),
            )
            now = a.sessions.clock()
            cand = Session(new_session_id(), new_resume_token(), 0, empty_state(), now, now)
            await other.restore(
                parse_caller(CALLER),
                token=welcome["resume_token"],
                candidate=cand,
                now_ms=now,
                owner="elsewhere",
            )
            await other.aclose()
            result = await closed(ws)
        assert not a.sessions.live and not a.sessions.by_sid
        touches = a.metrics.store_op_seconds["touch"]._sum.get()
        await asyncio.sleep(0.5)
        assert live.renewal is None
        assert a.metrics.store_op_seconds["touch"]._sum.get() == touches
    result.expect(4003, "session_conflict")


async def test_drain_after_a_stale_replacement_does_not_wait(
    make_gateway: GatewayFactory, store_config: Config, clock: Clock
) -> None:
    """A stale replacement cancels a pump holding an agent frame; the frame count it leaves
    must not make a later drain wait its whole flush timeout for frames nobody will save."""
    async with TestAgent() as voice:
        c = store_config.replace("agent", downstream=voice.url)
        async with make_gateway(c, clock=clock, delays=lambda: [0.01]) as gw:
            async with connect(url(gw.port)) as c1:
                w = await hello(c1, CALLER)
                await voice.wait_for(lambda r: len(r) == 1)
                (live,) = gw.sessions.live.values()
                await live.lock.acquire()
                clock.advance(30)  # past max_age: the next hello replaces the session
                async with connect(url(gw.port)) as c2:
                    await send(
                        c2, {"type": "hello", "caller": CALLER, "resume_token": w["resume_token"]}
                    )
                    await asyncio.sleep(0.2)  # the hello waits for the lock
                    await voice.send({"type": "say", "n": 1})
                    while live.unsaved == 0:
                        await asyncio.sleep(0.01)
                    live.lock.release()
                    assert (await recv(c2))["stale"] is True
                    await asyncio.sleep(0.3)
                    started = asyncio.get_running_loop().time()
                    await gw.sessions.drain(0)
                    took = asyncio.get_running_loop().time() - started
                    assert (await closed(c2)).code == 1012
    assert took < 2
