"""Protocol v1 over real WebSockets against a real gateway, once per store."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from typing import Any

import pytest

from gateway.config import Config
from gateway.core.protocol import Protocol
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from tests.support.clock import Clock
from tests.support.gateways import GatewayFactory
from tests.support.gwmetrics import restores, settled
from tests.support.stores import StoreFactory
from tests.support.wsclient import closed, connect, hello, recv, send, turn, url

PHONE = {"phone": "+14155550100", "call_id": "call-1"}


async def test_new_session(gateway: Gateway) -> None:
    """A first hello gets a fresh session: not resumed, version 0, empty state, a token."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
    assert welcome["type"] == "welcome"
    assert welcome["resumed"] is False
    assert "stale" not in welcome
    assert welcome["version"] == 0
    assert welcome["state"] == {"context": {}, "form_answers": {}, "last_turn": None}
    assert welcome["session_id"].startswith("s_")
    assert len(welcome["resume_token"]) >= 32
    assert restores(gateway, "miss") == 1


async def test_turns_acked_and_restored(gateway: Gateway) -> None:
    """Acked turns come back on reconnect, with the phone written another way."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        ack1 = await turn(ws, "t1", text="my name is Ada", form={"name": "Ada"})
        ack2 = await turn(ws, "t2", form={"date": "2026-12-01"}, context={"intent": "book"})
    assert ack1 == {"type": "ack", "turn_id": "t1", "version": 1}
    assert ack2 == {"type": "ack", "turn_id": "t2", "version": 2}
    async with connect(url(gateway.port)) as ws:
        again = await hello(
            ws,
            {"phone": "+1 (415) 555-0100", "call_id": "call-1"},
            resume_token=welcome["resume_token"],
        )
    assert again["resumed"] is True
    assert again["session_id"] == welcome["session_id"]
    assert again["resume_token"] != welcome["resume_token"]  # rotated on every welcome
    assert again["version"] == 2
    assert again["state"]["form_answers"] == {"name": "Ada", "date": "2026-12-01"}
    assert again["state"]["context"] == {"intent": "book"}
    assert again["state"]["last_turn"]["turn_id"] == "t2"
    assert restores(gateway, "hit") == 1


async def test_resent_turn_applied_once(gateway: Gateway) -> None:
    """A turn re-sent after a drop (its ack lost) is acked with its version, not applied again."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"n": 1})
        await turn(ws, "t2", form={"n": 2})
    async with connect(url(gateway.port)) as ws:
        await hello(ws, PHONE, resume_token=welcome["resume_token"])
        assert await turn(ws, "t1", form={"n": 1}) == {"type": "ack", "turn_id": "t1", "version": 1}
        assert (await turn(ws, "t3", form={"n": 3}))["version"] == 3
    async with connect(url(gateway.port)) as ws:
        state = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert state["version"] == 3
    assert state["state"]["form_answers"] == {"n": 3}
    dup = gateway.metrics.registry.get_sample_value(
        "hangon_session_turns_total", {"outcome": "duplicate"}
    )
    assert dup == 1


async def test_pipelined_turns_acked_in_order(gateway: Gateway) -> None:
    """Turns sent back to back, without waiting, are acked in order with rising versions."""
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "hello", "caller": PHONE})
        for i in range(20):
            await send(ws, {"type": "turn", "turn_id": f"t{i}", "form": {"i": i}})
        assert (await recv(ws))["type"] == "welcome"
        acks = [await recv(ws) for _ in range(20)]
    assert [(a["turn_id"], a["version"]) for a in acks] == [(f"t{i}", i + 1) for i in range(20)]


async def test_wrong_token_refused(gateway: Gateway) -> None:
    """A hello with the wrong token for a live session gets resume_refused and close 4501."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "hello", "caller": PHONE, "resume_token": "forged"})
        result = await closed(ws)
    result.expect(4501, "resume_refused", reconnect=False)
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert again["version"] == 1
    assert restores(gateway, "refused") == 1


async def test_tokenless_hello_resumes(gateway: Gateway) -> None:
    """With authentication off, a hello without a token resumes the caller's session."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE)
    assert again["resumed"] is True
    assert again["session_id"] == welcome["session_id"]
    assert again["state"]["form_answers"] == {"name": "Ada"}


async def test_stale_state_not_resumed(gateway: Gateway, clock: Clock) -> None:
    """State idle past max_age starts a fresh session flagged stale, never silently resumed."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})
    await settled(gateway)
    clock.advance(21)  # max_age is 20 s in the test config
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE, resume_token=welcome["resume_token"])
        ack = await turn(ws, "t1", form={"name": "Bea"})
    assert again["stale"] is True
    assert again["resumed"] is False
    assert again["session_id"] != welcome["session_id"]
    assert again["version"] == 0
    assert again["state"]["form_answers"] == {}
    assert ack["version"] == 1
    assert restores(gateway, "stale") == 1


async def test_disconnect_restarts_age(gateway: Gateway, clock: Clock) -> None:
    """A caller that stays connected longer than max_age still resumes after a drop."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})
        clock.advance(30)  # connected, silent, longer than max_age
    await settled(gateway)
    clock.advance(5)
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert again["resumed"] is True
    assert again["version"] == 1


async def test_bye_ends_session(gateway: Gateway) -> None:
    """bye closes with 1000; a later hello for that caller key gets session_ended, 4502."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})
        await send(ws, {"type": "bye"})
        result = await closed(ws)
    assert (result.code, result.error) == (1000, None)
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "hello", "caller": PHONE, "resume_token": welcome["resume_token"]})
        result = await closed(ws)
    result.expect(4502, "session_ended")
    assert restores(gateway, "ended") == 1


async def test_newer_connection_replaces_older(gateway: Gateway) -> None:
    """A second connection resuming a session closes the first with 4500; the second works."""
    async with connect(url(gateway.port)) as old:
        welcome = await hello(old, PHONE)
        await turn(old, "t1", form={"name": "Ada"})
        async with connect(url(gateway.port)) as new:
            again = await hello(new, PHONE, resume_token=welcome["resume_token"])
            result = await closed(old)
            assert (await turn(new, "t2", form={"date": "mon"}))["version"] == 2
    assert again["version"] == 1
    result.expect(4500, "session_replaced")
    await settled(gateway)
    assert gateway.metrics.registry.get_sample_value("hangon_session_active") == 0


async def test_tenants_are_isolated(gateway: Gateway) -> None:
    """The same phone and call ID in two tenants are two sessions."""
    async with connect(url(gateway.port)) as ws:
        a = await hello(ws, PHONE, tenant="acme")
        await turn(ws, "t1", form={"who": "acme"})
    async with connect(url(gateway.port)) as ws:
        b = await hello(ws, PHONE, tenant="globex")
    assert b["session_id"] != a["session_id"]
    assert b["resumed"] is False
    assert b["state"]["form_answers"] == {}


async def test_state_round_trips_exactly(gateway: Gateway) -> None:
    """Nested, unicode and numeric form values come back exactly as sent."""
    form: dict[str, Any] = {
        "name": "Zoë 山田 ✓",
        "party": 4,
        "price": 12.5,
        "ok": True,
        "none": None,
        "slots": [{"day": "mon", "hours": [9, 10]}],
    }
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form=form)
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert again["state"]["form_answers"] == form


async def test_quiet_connected_session_is_renewed(
    make_gateway: GatewayFactory, config: Config, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A caller connected but silent for longer than ttl and max_age keeps its session."""
    quick = dataclasses.replace(settings, ttl=0.9, max_age=0.45)
    cfg = config.replace("store", ttl=0.9, max_age=0.45)
    async with make_gateway(cfg, store=make_store(quick)) as gw:
        async with connect(url(gw.port)) as ws:
            welcome = await hello(ws, PHONE)
            await turn(ws, "t1", form={"name": "Ada"})
            await asyncio.sleep(1.5)  # silent: no turn, only renewals
            assert (await turn(ws, "t2", form={"date": "mon"}))["version"] == 2
        async with connect(url(gw.port)) as ws:
            again = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert again["resumed"] is True
    assert again["version"] == 2


async def test_state_size_is_bounded(gateway: Gateway) -> None:
    """A turn that would grow the state past max_state_size is refused with state_too_big
    and close 1009; the turns before it stay intact."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        # last_turn repeats the form: three turns make 240 kB of the 256 kB allowed.
        for i in range(3):
            assert (await turn(ws, f"t{i}", form={f"f{i}": "x" * 60_000}))["version"] == i + 1
        await send(ws, {"type": "turn", "turn_id": "t3", "form": {"f3": "x" * 60_000}})
        result = await closed(ws)
    result.expect(1009, "state_too_big")
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert again["version"] == 3
    assert sorted(again["state"]["form_answers"]) == ["f0", "f1", "f2"]


async def test_lost_welcome_after_stale_does_not_lock_out(gateway: Gateway, clock: Clock) -> None:
    """A client whose welcome was lost after its stale session was replaced comes back with
    its old token and gets the new session (still flagged stale), not resume_refused."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"a": 1})
    await settled(gateway)
    clock.advance(25)  # past max_age (20 s), before ttl (60 s): stale
    token = welcome["resume_token"]
    async with connect(url(gateway.port)) as ws:  # the client is gone before the welcome
        await send(ws, {"type": "hello", "caller": PHONE, "resume_token": token})
    await settled(gateway)
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE, resume_token=token)
        ack = await turn(ws, "t1", form={"b": 2})
    assert again["type"] == "welcome"
    assert again["stale"] is True and again["resumed"] is False
    assert again["session_id"] != welcome["session_id"]
    assert again["resume_token"] != token
    assert ack["version"] == 1


async def test_ping_gets_pong_before_and_after_hello(gateway: Gateway) -> None:
    """An application-level ping is answered with pong before hello and in an open session,
    and the session carries on."""
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        await hello(ws, {"user_id": "u-ping", "call_id": "c"})
        await send(ws, {"type": "ping"})
        assert await recv(ws) == {"type": "pong"}
        assert (await turn(ws, "t1", form={"a": 1}))["type"] == "ack"


def _connection_tasks() -> int:
    """Running tasks, but for the store's takeover listener (started when first needed)."""
    store = ("RedisStore.listen", "MemoryStore.listen", "PubSub.get_message")
    return sum(getattr(t.get_coro(), "__qualname__", "") not in store for t in asyncio.all_tasks())


async def test_idle_session_holds_no_task_of_its_own(gateway: Gateway) -> None:
    """A connected, idle session costs one task, its handler, as any websockets connection
    does, and none more (keepalive included): ten thousand sessions must stay small."""
    before = _connection_tasks()
    async with contextlib.AsyncExitStack() as stack:
        for i in range(10):
            # No keepalive on the client side: only the server's tasks are counted.
            ws = await stack.enter_async_context(connect(url(gateway.port), ping_interval=None))
            await hello(ws, {"user_id": f"u{i}", "call_id": "c"})
            await turn(ws, "t1", form={"name": "Ada"})
        await asyncio.sleep(0.05)  # let every sender finish
        added = _connection_tasks() - before
        held = [live.renewal for live in gateway.sessions.live.values()]
    assert added == 10
    assert len(held) == 10
    assert all(isinstance(timer, asyncio.TimerHandle) for timer in held)


async def test_turns_and_acks_are_acted_on_as_they_are_read(gateway: Gateway) -> None:
    """On an open session, a turn or an ack that nothing makes wait is acted on from the
    socket's data_received: the handler's queue is never used, and the answers are the
    same. What must wait (a turn while the session is locked, a bye) goes to the handler,
    in order."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, PHONE)
        (conn,) = gateway.sessions.connections
        queued: list[object] = []
        put = conn.ws.recv_messages.put

        def counted(frame: Any) -> None:
            queued.append(frame)
            put(frame)

        conn.ws.recv_messages.put = counted  # type: ignore[method-assign]
        for i in range(3):
            ack = await turn(ws, f"t{i}", form={"i": i})
            assert (ack["type"], ack["version"]) == ("ack", i + 1)
        await send(ws, {"type": "ack", "seq": 0})
        assert queued == []
        (live,) = gateway.sessions.live.values()
        async with live.lock:  # as a renewal would: the turn waits for it, in the handler
            await send(ws, {"type": "turn", "turn_id": "t3", "form": {"i": 3}})
            await asyncio.sleep(0.05)
            assert len(queued) == 1
        ack = await recv(ws)
        assert (ack["turn_id"], ack["version"]) == ("t3", 4)
        await send(ws, {"type": "bye"})
        await closed(ws)
    assert len(queued) == 2


async def test_a_bug_on_a_turn_taken_as_read_fails_the_connection(
    gateway: Gateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug met while acting on a frame as it is read closes the connection with
    internal_error, as in the handler: the turn is never dropped unanswered. The session
    stays whole, and the client resumes it."""
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})

        def broken(self: Protocol, data: str) -> None:
            raise RuntimeError("bug")

        monkeypatch.setattr(Protocol, "now", broken)
        await send(ws, {"type": "turn", "turn_id": "t2", "form": {"name": "Bob"}})
        end = await closed(ws)
    assert end.error is not None and end.error["code"] == "internal_error"
    assert end.code == 1011
    assert "unexpected error on a client connection" in caplog.text
    monkeypatch.undo()
    async with connect(url(gateway.port)) as ws:
        resumed = await hello(ws, PHONE, resume_token=welcome["resume_token"])
    assert resumed["version"] == 1
    assert resumed["state"]["form_answers"] == {"name": "Ada"}
