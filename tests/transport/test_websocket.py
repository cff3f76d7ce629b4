"""A closed client connection is freed by reference counting, not left to the collector.

The gateway runs the cyclic garbage collector rarely (gateway.cli.tune_gc): a closed
connection held by a reference cycle stays in memory, buffers and all, until a full
collection. These tests turn the collector off and wait for the server's side of the
connection to go.
"""

from __future__ import annotations

import asyncio
import weakref

import pytest
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from gateway.server import Gateway
from tests.support.wsclient import connect, hello, turn, url

PHONE = {"phone": "+14155550100", "call_id": "call-1"}


def server_side(gateway: Gateway) -> weakref.ref[ServerConnection]:
    (conn,) = gateway.sessions.connections
    return weakref.ref(conn.ws)


async def freed(ref: weakref.ref[ServerConnection]) -> bool:
    for _ in range(200):
        if ref() is None:
            return True
        await asyncio.sleep(0.01)
    return False


@pytest.mark.usefixtures("no_collector")
async def test_closed_connection_freed(gateway: Gateway) -> None:
    """A session's connection, closed by the client, goes as soon as it is closed."""
    async with connect(url(gateway.port), subprotocols=["hangon.v1"]) as ws:
        assert ws.subprotocol == "hangon.v1"
        await hello(ws, PHONE)
        await turn(ws, "t1", form={"name": "Ada"})
        ref = server_side(gateway)
    assert await freed(ref), "the closed connection waits for the cyclic collector"


@pytest.mark.usefixtures("no_collector")
async def test_dropped_mid_frame_connection_freed(gateway: Gateway) -> None:
    """A connection dropped in the middle of a frame (the parser keeps the error it hit,
    traceback and all) goes too."""
    ws: ClientConnection
    async with connect(url(gateway.port)) as ws:
        await hello(ws, PHONE)
        ref = server_side(gateway)
        ws.transport.write(b"\x81\xfe\x01")  # a text frame's header, cut short
        await asyncio.sleep(0.05)
        ws.transport.abort()
    assert await freed(ref), "the dropped connection waits for the cyclic collector"


async def test_unknown_subprotocols_accepted_without_one(gateway: Gateway) -> None:
    """Offers the gateway does not speak are not refused: it answers none of them."""
    async with connect(url(gateway.port), subprotocols=["chat", "hangon.v2"]) as ws:
        assert ws.subprotocol is None
        welcome = await hello(ws, PHONE)
    assert welcome["type"] == "welcome"


async def test_upgrade_let_go_after_hello(gateway: Gateway) -> None:
    """An open connection keeps its upgrade's headers only until its hello is answered."""
    async with connect(url(gateway.port), additional_headers={"X-Padding": "x" * 500}) as ws:
        for _ in range(100):
            if gateway.sessions.connections:
                break
            await asyncio.sleep(0.01)
        (conn,) = gateway.sessions.connections
        assert conn.ws.request is not None
        assert conn.ws.request.headers["X-Padding"] == "x" * 500
        await hello(ws, PHONE)
        assert conn.ws.request.path == "/ws"
        assert not conn.ws.request.headers
        assert conn.ws.response is None
        assert await turn(ws, "t1", form={"name": "Ada"}) == {
            "type": "ack",
            "turn_id": "t1",
            "version": 1,
        }


async def test_frames_for_a_client_gone_are_dropped_without_a_sender(gateway: Gateway) -> None:
    """A client dropped while its turn was being written: the ack queued for it is let go
    at once, not handed to a sender that would only find the connection closed."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, PHONE)
        (conn,) = gateway.sessions.connections
        ws.transport.abort()
        for _ in range(200):
            if conn.ws.protocol.state is State.CLOSED:
                break
            await asyncio.sleep(0.01)
    conn.protocol.send_ack("t1", 1)
    assert conn.write_now()
    assert conn.protocol.queued == 0
