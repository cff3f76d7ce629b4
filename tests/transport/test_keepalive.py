"""Keepalive from one task: a client that stops answering pings is closed with 1011, one that
answers stays, and an idle connection costs no task for it."""

from __future__ import annotations

import asyncio
import json
import socket

from websockets.frames import Close, Frame, Opcode
from websockets.protocol import State

from gateway.config import Config
from tests.support.gateways import GatewayFactory
from tests.support.wsclient import connect, hello, raw_client, turn, url


async def silent_client(port: int) -> list[Frame]:
    """Open a WebSocket that never sends a pong (nor anything else); return the frames it
    got until the gateway closed it."""
    reader, writer, protocol = await raw_client(port)
    frames: list[Frame] = []
    try:
        async with asyncio.timeout(10):
            while not any(f.opcode is Opcode.CLOSE for f in frames):
                data = await reader.read(65536)
                if not data:
                    break
                protocol.receive_data(data)
                frames += [e for e in protocol.events_received() if isinstance(e, Frame)]
                protocol.data_to_send()  # the pongs websockets queued: never sent
    finally:
        writer.close()
    return frames


async def test_silent_client_is_closed_and_answering_one_kept(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """With pings every 0.2 s and a 0.2 s timeout, a client that never answers gets one ping
    and then close 1011 "keepalive ping timeout"; a client beside it that answers stays
    open and keeps being served."""
    cfg = config.replace("keepalive", ping_interval=0.2, ping_timeout=0.2)
    async with make_gateway(cfg) as gateway:
        async with connect(url(gateway.port), ping_interval=None) as answering:
            loop = asyncio.get_running_loop()
            started = loop.time()
            frames = await silent_client(gateway.port)
            took = loop.time() - started
            await asyncio.sleep(0.5)  # two more intervals: the answering client is pinged
            assert answering.state is State.OPEN
            welcome = await hello(answering, {"user_id": "u-alive", "call_id": "c"})
    pings = [f for f in frames if f.opcode is Opcode.PING]
    close = Close.parse(frames[-1].data)
    assert len(pings) == 1
    assert (close.code, close.reason) == (1011, "keepalive ping timeout")
    assert 0.3 <= took < 3
    assert welcome["type"] == "welcome"


async def test_keepalive_off_sends_no_ping(make_gateway: GatewayFactory, config: Config) -> None:
    """With --ping-interval none, no ping is ever sent."""
    cfg = config.replace("keepalive", ping_interval=None)
    async with make_gateway(cfg) as gateway:
        reader, writer, protocol = await raw_client(gateway.port)
        await asyncio.sleep(1.5)
        writer.close()
        protocol.receive_data(await reader.read(65536))
    frames = [e for e in protocol.events_received() if isinstance(e, Frame)]
    assert frames == []


def ping_tasks() -> int:
    return sum(
        getattr(t.get_coro(), "__qualname__", "") == "Keepalive._ping" for t in asyncio.all_tasks()
    )


async def test_a_client_that_stopped_reading_holds_one_ping_at_most(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A client that stopped reading while its welcome is still being sent has one ping in
    flight at most, however many intervals pass, as with websockets' own keepalive (no pong
    deadline and a long send timeout here, so that nothing cuts it meanwhile)."""
    cfg = config.replace("keepalive", ping_interval=0.2, ping_timeout=None).replace(
        "limits", max_message_size=1_000_000, max_state_size=15_000_000, send_timeout=60.0
    )
    caller = {"user_id": "u-stuck", "call_id": "c"}
    async with make_gateway(cfg) as gateway:
        async with connect(url(gateway.port), max_size=None) as first:
            welcome = await hello(first, caller)
            for i in range(8):  # a 7 MB state: its welcome fills any socket buffer
                await turn(first, f"t{i}", form={f"k{i}": "x" * 900_000})
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
        reader, writer, protocol = await raw_client(gateway.port, sock)
        protocol.receive_data(await reader.readuntil(b"\r\n\r\n"))
        writer.transport.pause_reading()  # and never reads again
        frame = {"type": "hello", "caller": caller, "resume_token": welcome["resume_token"]}
        protocol.send_text(json.dumps(frame).encode())
        writer.write(b"".join(protocol.data_to_send()))
        await asyncio.sleep(2)  # ten intervals
        stuck = [c for c in gateway.sessions.connections if c.sending]
        in_flight = ping_tasks()
        writer.transport.abort()
    assert len(stuck) == 1
    assert in_flight <= 1
