"""Peers that do not read, read slowly or flood: each costs a bounded amount of memory for a
bounded time, and nobody else pays for it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.config import Config
from gateway.server import Gateway
from tests.support.agents import TestAgent
from tests.support.gateways import GatewayFactory
from tests.support.gwmetrics import errors
from tests.support.peers import Bystander, NonReader, agent_cuts, waiting
from tests.support.wsclient import connect, hello, recv, send, url

SEND_TIMEOUT = 1.0
QUEUE = 65_536
LIMITS: dict[str, Any] = {
    "max_message_size": 16_384,
    "max_state_size": 32_768,
    "max_send_queue": QUEUE,
    "send_timeout": SEND_TIMEOUT,
    # Turns as fast as the test sends them: the kernel's socket buffers (megabytes, on
    # loopback) fill first, and only then does anything wait in the gateway.
    "max_turns_per_second": None,
}
WRITE_LIMIT = 2**15
"""websockets' high-water mark: what a transport holds before a send waits."""
CALLER = {"user_id": "hostile", "call_id": "c"}

GatewayBeside = Callable[[str], AbstractAsyncContextManager[tuple[Gateway, Bystander]]]


@pytest.fixture
def gateway_beside(make_gateway: GatewayFactory, config: Config) -> GatewayBeside:
    """``async with gateway_beside(agent_url) as (gw, bystander)``: a gateway with the tight
    :data:`LIMITS` whose sessions dial the agent at ``agent_url``, and a bystander on it."""

    @contextlib.asynccontextmanager
    async def open_gateway(agent_url: str) -> AsyncIterator[tuple[Gateway, Bystander]]:
        cfg = config.replace("limits", **LIMITS).replace("agent", downstream=agent_url)
        async with make_gateway(cfg) as gw, Bystander(gw.port) as bystander:
            yield gw, bystander

    return open_gateway


def big_states(frame: dict[str, Any], scratch: dict[str, Any]) -> list[Any]:
    """Answer every turn with a 4 KB state change: the state grows to 24 KB, and each
    change is sent to the client as the whole state."""
    if frame["type"] != "turn":
        return []
    n = scratch["n"] = scratch.get("n", 0) + 1
    return [{"type": "state", "patch": {"context": {f"blob{n % 6}": "x" * 4_000, "n": n}}}]


async def flood_turns(gw: Gateway, peer: NonReader, *, seconds: float) -> int:
    """Send turns at about 100 a second until the gateway hangs up; return the most bytes
    seen waiting for any connection meanwhile."""
    most = 0
    async with asyncio.timeout(seconds):
        for i in range(100_000):
            if peer.closed.is_set():
                break
            if not peer.closing():
                peer.send({"type": "turn", "turn_id": f"t{i}", "text": f"turn {i}"})
            most = max(most, waiting(gw))
            await asyncio.sleep(0.01)
    return most


async def test_a_client_that_stops_reading_is_cut_and_resumes(
    gateway_beside: GatewayBeside,
) -> None:
    """A client that stops reading while the agent answers each of its turns with a 24 KB
    state is cut with slow_consumer within two send timeouts of falling behind, with no
    more than the queue limit waiting for it; its session then resumes whole."""
    async with TestAgent(big_states) as agent:
        async with gateway_beside(agent.url) as (gw, bystander):
            peer = NonReader(gw.port)
            await peer.open()
            peer.send({"type": "hello", "caller": CALLER})
            welcome = await peer.read_welcome()
            peer.stop_reading()
            most = await flood_turns(gw, peer, seconds=10)
            await peer.aclose()
            assert errors(gw, "slow_consumer") == 1
            # The agent, held back because the client is, is not blamed for it.
            assert agent_cuts(gw, "slow_consumer") == 0
            # The queue limit, one frame over it, and what the transport holds.
            assert most <= QUEUE + 2 * 25_000 + WRITE_LIMIT
            async with connect(url(gw.port)) as ws:
                again = await hello(ws, CALLER, resume_token=welcome["resume_token"])
            # Every turn the agent heard of was durable, and the last of them is in the state.
            applied = agent.of_type("turn")
            assert again["resumed"] is True
            assert again["state"]["last_turn"]["turn_id"] == applied[-1]["turn_id"]
            await bystander.check()


async def test_a_client_that_reads_slowly_is_cut(gateway_beside: GatewayBeside) -> None:
    """A client that reads 2 KB a second while 24 KB states pile up for it is cut by the
    queue limit, however steadily it reads."""
    async with TestAgent(big_states) as agent:
        async with gateway_beside(agent.url) as (gw, bystander):
            peer = NonReader(gw.port, rate=2_000)
            await peer.open()
            peer.send({"type": "hello", "caller": CALLER})
            await peer.read_welcome()
            peer.stop_reading()
            most = await flood_turns(gw, peer, seconds=15)
            await peer.aclose()
            assert errors(gw, "slow_consumer") == 1
            assert most <= QUEUE + 2 * 25_000 + WRITE_LIMIT
            await bystander.check()


async def test_a_client_that_sends_turns_and_never_reads_stops_being_read(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A client that floods turns and reads none of their acks is read no further once an
    ack has to wait: its acks never pile up in the gateway past what the transport holds,
    and it is cut after the send timeout."""
    async with make_gateway(config.replace("limits", **LIMITS)) as gw:
        peer = NonReader(gw.port)
        await peer.open()
        peer.send({"type": "hello", "caller": CALLER})
        await peer.read_welcome()
        peer.stop_reading()
        pad = "x" * 120  # big acks: the kernel's buffers fill sooner
        most = 0
        async with asyncio.timeout(10):
            for i in range(1_000_000):
                if peer.closed.is_set():
                    break
                if not peer.closing():
                    peer.send({"type": "turn", "turn_id": f"{pad}{i}"})
                if i % 20 == 0:
                    most = max(most, waiting(gw))
                    await asyncio.sleep(0.001)
        await peer.aclose()
        assert errors(gw, "slow_consumer") == 1
        # One ack over the transport's high-water mark, not a queue of them.
        assert most <= WRITE_LIMIT + 2 * 200, most


def loud_phone(frame: dict[str, Any], scratch: dict[str, Any]) -> list[Any]:
    """Answer each chunk of the caller's audio with four 8 KB chunks of its own."""
    if frame["type"] != "media":
        return []
    payload = base64.b64encode(b"\xff" * 6_000).decode()
    return [{"type": "media", "payload": payload}] * 4


async def test_a_phone_stream_that_stops_reading_is_cut(gateway_beside: GatewayBeside) -> None:
    """A Twilio stream that stops reading while the agent talks to it is cut with
    slow_consumer; the bystander is untouched."""
    async with TestAgent(loud_phone) as agent:
        async with gateway_beside(agent.url) as (gw, bystander):
            peer = NonReader(gw.port, path="/v1/twilio")
            await peer.open()
            peer.send({"event": "connected", "protocol": "Call", "version": "1.0.0"})
            start = {"callSid": "CA" + "1" * 32, "streamSid": "MZ" + "1" * 32}
            start["customParameters"] = {"From": "+14155550100"}  # type: ignore[assignment]
            peer.send({"event": "start", "sequenceNumber": "1", "start": start})
            peer.stop_reading()
            chunk = base64.b64encode(b"\x7f" * 160).decode()
            most = 0
            async with asyncio.timeout(10):
                for i in range(10_000):
                    if peer.closed.is_set():
                        break
                    if not peer.closing():
                        media = {"track": "inbound", "chunk": str(i), "timestamp": str(20 * i)}
                        media["payload"] = chunk
                        peer.send(
                            {"event": "media", "streamSid": start["streamSid"], "media": media}
                        )
                    most = max(most, waiting(gw))
                    await asyncio.sleep(0.02)
            await peer.aclose()
            assert errors(gw, "slow_consumer") == 1
            assert most <= QUEUE + 2 * 9_000 + WRITE_LIMIT
            await bystander.check()


async def test_an_agent_that_stops_reading_is_dropped_and_redialled(
    gateway_beside: GatewayBeside,
) -> None:
    """An agent that stops reading has its link dropped once turns for it pass the queue
    limit, and redialled; the caller's turns are all acknowledged meanwhile, and there is
    never more than one link for the session."""
    release = asyncio.Event()
    opened: list[ServerConnection] = []

    async def deaf(ws: ServerConnection) -> None:
        opened.append(ws)
        await release.wait()

    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    listener.bind(("127.0.0.1", 0))
    async with serve(deaf, sock=listener, max_queue=1, max_size=None) as server:
        try:
            port = server.sockets[0].getsockname()[1]
            async with gateway_beside(f"ws://127.0.0.1:{port}/") as (gw, bystander):
                links = gw.metrics.agent_links_active
                async with connect(url(gw.port)) as ws:
                    await hello(ws, CALLER)
                    most_links, after_cut = 0.0, 0
                    # The kernel's socket buffers take megabytes first, on loopback.
                    for i in range(2_000):
                        await send(ws, {"type": "turn", "turn_id": f"t{i}", "text": "y" * 12_000})
                        assert (await recv(ws))["type"] == "ack"
                        most_links = max(most_links, links._value.get())
                        after_cut += agent_cuts(gw, "slow_consumer") > 0
                        if after_cut > 20:
                            break
                assert agent_cuts(gw, "slow_consumer") >= 1
                async with asyncio.timeout(5):
                    while len(opened) < 3:  # this session's link, redialled; the bystander's
                        await asyncio.sleep(0.05)
                assert most_links <= 2  # this session's, and the bystander's
                await bystander.check()
        finally:
            release.set()


def flood(frame: dict[str, Any], scratch: dict[str, Any]) -> list[Any]:
    """Say 600 things of a kilobyte each the moment the session starts."""
    if frame["type"] != "session.start":
        return []
    return [{"type": "say", "n": n, "text": "z" * 1_000} for n in range(600)]


async def test_a_flooding_agent_is_held_back(gateway_beside: GatewayBeside) -> None:
    """An agent that floods its session is held back by a bounded inbox: no more than the
    queue limit of its frames waits in the gateway, and the client gets every message, in
    order, once."""
    async with TestAgent(flood) as agent:
        async with gateway_beside(agent.url) as (gw, bystander):
            async with connect(url(gw.port)) as ws:
                await hello(ws, CALLER)
                seqs: list[int] = []
                most = 0
                while len(seqs) < 600:
                    frame = await recv(ws)
                    assert frame["type"] == "msg", frame
                    seqs.append(frame["seq"])
                    await send(ws, {"type": "ack", "seq": frame["seq"]})
                    inboxes = [live.inbox for live in gw.sessions.live.values() if live.inbox]
                    most = max([most, *(inbox.size for inbox in inboxes)])
            assert seqs == list(range(1, 601))
            assert most <= QUEUE + 1_100
            await bystander.check()
