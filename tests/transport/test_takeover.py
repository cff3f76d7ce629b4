"""A reconnect takes its session over from an older connection on the same instance, even one
that is half-open; of several racing reconnects exactly one keeps the session; and a hello
its client abandoned takes nothing over."""

from __future__ import annotations

import asyncio

from websockets.protocol import State

from gateway.server import Gateway
from gateway.store.base import StoreSettings
from tests.support.gateways import GatewayFactory
from tests.support.stores import StoreFactory
from tests.support.storewrap import SlowFirstRestore
from tests.support.wsclient import connect, hello, recv, send, turn, url

PHONE = {"phone": "+14155550100", "call_id": "call-takeover"}


async def test_takeover_of_half_open_connection_does_not_wait(gateway: Gateway) -> None:
    """The welcome is sent while the half-open old connection is still being closed."""
    async with connect(url(gateway.port)) as old:
        welcome = await hello(old, PHONE)
        (live,) = gateway.sessions.live.values()
        assert live.client is not None
        server_side = live.client.ws
        old.transport.pause_reading()  # the old client is gone: it answers nothing any more
        async with connect(url(gateway.port)) as new:
            again = await hello(new, PHONE, resume_token=welcome["resume_token"])
            # Closing the old one waits for a close frame that will not come (close_timeout).
            old_state = server_side.state
        old.transport.resume_reading()
    assert again["type"] == "welcome" and again["resumed"] is True
    assert old_state is State.CLOSING


async def test_racing_takeovers_leave_one_connection(gateway: Gateway) -> None:
    """Two reconnects racing for a session: the last one keeps it, the other is told 4500."""
    async with connect(url(gateway.port)) as old:
        welcome = await hello(old, PHONE)
        token = welcome["resume_token"]
        old.transport.pause_reading()
        async with connect(url(gateway.port)) as b, connect(url(gateway.port)) as c:
            await send(b, {"type": "hello", "caller": PHONE, "resume_token": token})
            assert (await recv(b))["type"] == "welcome"
            await send(c, {"type": "hello", "caller": PHONE, "resume_token": token})
            assert (await recv(c))["type"] == "welcome"
            replaced = await recv(b)
            live = [s.client for s in gateway.sessions.live.values()]
            assert len(live) == 1 and live[0] is not None
        old.transport.resume_reading()
    assert replaced["type"] == "error" and replaced["code"] == "session_replaced"


async def test_abandoned_hello_does_not_take_over(
    make_gateway: GatewayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A hello whose client left while its restore was slow neither takes the session nor
    holds up the connection the client opened next, beyond that restore."""
    store = SlowFirstRestore(make_store(settings))
    async with make_gateway(store=store) as gw:
        async with connect(url(gw.port)) as abandoned:
            await send(abandoned, {"type": "hello", "caller": PHONE})
            while store.first:
                await asyncio.sleep(0.01)
        async with connect(url(gw.port)) as again:
            await send(again, {"type": "hello", "caller": PHONE})
            store.release.set()
            assert (await recv(again))["type"] == "welcome"
            ack = await turn(again, "t1", form={"a": 1})
            live = [s.client.ws.state if s.client else None for s in gw.sessions.live.values()]
    assert ack == {"type": "ack", "turn_id": "t1", "version": 1}
    assert live == [State.OPEN]


async def test_abandoned_hello_leaves_the_live_connection_writing(
    make_gateway: GatewayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """A hello abandoned during its restore started a new epoch; the connection that holds
    the session here adopts it and its turns are still written."""
    store = SlowFirstRestore(make_store(settings), slow=2)
    async with make_gateway(store=store) as gw:
        async with connect(url(gw.port)) as live:
            welcome = await hello(live, PHONE)
            async with connect(url(gw.port)) as abandoned:
                await send(abandoned, {"type": "hello", "caller": PHONE})
                while store.first:
                    await asyncio.sleep(0.01)
            assert gw.server is not None
            while sum(c.state is State.OPEN for c in gw.server.connections) != 1:
                await asyncio.sleep(0.01)  # the abandoned connection is gone
            store.release.set()
            ack = await turn(live, "t1", form={"a": 1})
    assert welcome["resumed"] is False
    assert ack == {"type": "ack", "turn_id": "t1", "version": 1}
