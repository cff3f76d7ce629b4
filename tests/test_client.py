"""gateway.client.Client against real gateways over loopback: it resumes after a drop and
after a gateway restart by itself, re-sends an unacknowledged turn once, hands each agent
message over exactly once, honours Retry-After and an overloaded gateway's retry_after, and
stops on a close that forbids resuming."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve

from gateway.client import Client, Restored, reconnects
from gateway.config import Config
from gateway.core.auth import parse_auth_keys
from gateway.exceptions import ClientClosed
from gateway.server import Gateway
from tests.support.agents import TestAgent, booking
from tests.support.authkeys import keys_document, token
from tests.support.gateway_process import GatewayProcess
from tests.support.gateways import GatewayFactory
from tests.support.poll import until
from tests.support.redis_server import RedisServer, free_port
from tests.support.wsclient import connect, hello, url

CALLER = {"phone": "+14155550100", "call_id": "call-client"}


def fast(port: int, **kwargs: Any) -> Client:
    """A client with short reconnect delays, for tests."""
    return Client(url(port), CALLER, initial_delay=0.05, max_delay=0.5, **kwargs)


def test_which_closes_are_resumed() -> None:
    """Drops, restarts, overload and retryable errors are resumed; bye, protocol errors and
    the terminal range are not."""
    assert all(reconnects(c) for c in (None, 1001, 1006, 1011, 1012, 1013, 4001, 4003, 4499))
    assert not any(reconnects(c) for c in (1000, 1003, 1007, 1008, 1009, 4500, 4501, 4999))


async def test_resumes_after_a_drop_and_delivers_each_message_once(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A connection aborted mid-call: the client reconnects by itself, resumes the session,
    gets the turn sent while it was down acknowledged once, and every agent message once."""
    messages: list[tuple[int, Any]] = []
    restores: list[Restored] = []
    async with TestAgent(booking) as voice:
        cfg = config.replace("agent", downstream=voice.url)
        async with make_gateway(cfg) as gw:
            client = fast(
                gw.port,
                on_message=lambda data, seq: messages.append((seq, data)),
                on_restored=restores.append,
            )
            runner = asyncio.create_task(client.run())
            await until(lambda: len(messages) >= 1)  # the greeting: the agent link is up
            assert await client.turn("t1", text="Ada") == 1
            await until(lambda: len(messages) >= 2)
            client.abort()
            second = await client.turn("t2", text="Friday")
            await until(lambda: client.state.get("form_answers", {}).get("date") == "Friday")
            await client.bye()
            await asyncio.wait_for(runner, 5)
    assert second >= 2
    assert [seq for seq, _ in messages] == list(range(1, len(messages) + 1))
    assert [r.resumed for r in restores] == [False, True]
    assert restores[1].session_id == restores[0].session_id
    assert restores[1].state["form_answers"]["name"] == "Ada"


@pytest.mark.slow
async def test_rides_out_a_gateway_restart(tmp_path: Path, own_redis: RedisServer) -> None:
    """The gateway is SIGKILLed and started again on its port: a turn sent meanwhile waits,
    then is acknowledged once, and the welcome restores every earlier answer."""
    args = ["--redis-url", own_redis.url, "--downstream", "off"]
    first = GatewayProcess(tmp_path / "first.log", *args)
    first.start()
    restores: list[Restored] = []
    client = fast(first.port, on_restored=restores.append)
    runner = asyncio.create_task(client.run())
    second = GatewayProcess(tmp_path / "second.log", *args, port=first.port)
    try:
        assert await client.turn("t1", form={"name": "Ada"}) == 1
        await asyncio.to_thread(first.kill)
        pending = asyncio.create_task(client.turn("t2", form={"date": "Friday"}))
        await asyncio.sleep(0.3)
        assert not pending.done()
        await asyncio.to_thread(second.start)
        assert await asyncio.wait_for(pending, 10) == 2
        await client.bye()
        await asyncio.wait_for(runner, 5)
    finally:
        runner.cancel()
        if second.proc is not None:
            second.terminate()
    assert [r.resumed for r in restores] == [False, True]
    assert restores[1].state["form_answers"] == {"name": "Ada"}


async def test_stops_when_another_connection_takes_the_session(gateway: Gateway) -> None:
    """A newer connection resumes the session: the client is closed with 4500, does not
    come back, and a turn still waiting for its ack fails with the code."""
    client = fast(gateway.port)
    runner = asyncio.create_task(client.run())
    await client.connected.wait()
    async with connect(url(gateway.port)) as other:
        await hello(other, CALLER, resume_token=client.resume_token)
        with pytest.raises(ClientClosed) as info:
            await asyncio.wait_for(runner, 5)
    assert info.value.code == 4500
    assert client.connects == 1


async def test_waits_for_retry_after_of_a_draining_gateway(gateway: Gateway) -> None:
    """A gateway refusing upgrades with 503 and Retry-After: 1 (draining) is not retried
    before a second has passed; once it accepts again the client connects."""
    delays: list[float] = []
    gateway.closing = True
    client = fast(gateway.port, on_reconnecting=lambda code, delay: delays.append(delay))
    runner = asyncio.create_task(client.run())
    await until(lambda: len(delays) >= 1)
    gateway.closing = False
    await asyncio.wait_for(client.connected.wait(), 5)
    await client.aclose()
    await asyncio.wait_for(runner, 5)
    assert delays[0] >= 1.0


async def test_gives_up_after_max_attempts(config: Config) -> None:
    """Nobody listens: after max_attempts failed connects, run() raises ClientClosed."""
    client = fast(free_port(), max_attempts=3)
    with pytest.raises(ClientClosed, match="3 attempts"):
        await asyncio.wait_for(client.run(), 10)


async def test_a_client_built_with_token_and_last_seq_gets_no_message_twice(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """A second client given the first one's token and last_seq resumes after them: no
    message the first handled is handed over again, even after a drop."""
    async with TestAgent(booking) as voice:
        cfg = config.replace("agent", downstream=voice.url)
        async with make_gateway(cfg) as gw:
            first_seen: list[int] = []
            first = fast(gw.port, on_message=lambda data, seq: first_seen.append(seq))
            runner = asyncio.create_task(first.run())
            await until(lambda: len(first_seen) >= 1)
            await first.turn("t1", text="Ada")
            await until(lambda: len(first_seen) >= 2)
            await first.aclose()
            await runner
            seen: list[int] = []
            second = fast(
                gw.port,
                resume_token=first.resume_token,
                last_seq=first.last_seq,
                on_message=lambda data, seq: seen.append(seq),
            )
            runner = asyncio.create_task(second.run())
            await second.connected.wait()
            second.abort()
            await until(lambda: second.connects == 2)
            await second.turn("t2", text="Friday")
            await second.aclose()
            await runner
    assert seen and min(seen) > max(first_seen)
    assert seen == list(range(seen[0], seen[0] + len(seen)))


async def test_aclose_while_connecting_stops_at_once(gateway: Gateway) -> None:
    """aclose() right after run() started: run() returns without serving a session."""
    client = fast(gateway.port)
    runner = asyncio.create_task(client.run())
    await asyncio.sleep(0)
    await client.aclose()
    await asyncio.wait_for(runner, 2)
    assert client.connects == 0


async def test_calls_after_the_client_stopped_fail_at_once(gateway: Gateway) -> None:
    """turn() and bye() on a stopped client raise ClientClosed instead of waiting forever."""
    client = fast(gateway.port)
    runner = asyncio.create_task(client.run())
    await client.connected.wait()
    await client.aclose()
    await runner
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(client.turn("late", text="x"), 2)
    with pytest.raises(ClientClosed):
        await asyncio.wait_for(client.bye(), 2)


async def test_bye_while_disconnected_goes_out_after_the_next_welcome(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """bye() while the gateway is down is sent once the client has resumed; run() returns."""
    args = ["--redis-url", own_redis.url, "--downstream", "off"]
    first = GatewayProcess(tmp_path / "first.log", *args)
    first.start()
    second = GatewayProcess(tmp_path / "second.log", *args, port=first.port)
    client = fast(first.port)
    runner = asyncio.create_task(client.run())
    try:
        await client.connected.wait()
        await asyncio.to_thread(first.kill)
        await until(lambda: not client.connected.is_set())
        await client.bye()
        await asyncio.to_thread(second.start)
        await asyncio.wait_for(runner, 10)
    finally:
        runner.cancel()
        if second.proc is not None:
            second.terminate()
    assert client.connects == 2


async def shed_or_welcome(ws: ServerConnection, retry_after: float | None) -> None:
    """Play the gateway after a hello: shed it with 1013 and ``retry_after``, or welcome it."""
    await ws.recv()  # the hello
    if retry_after is not None:
        error = {"type": "error", "code": "overloaded", "message": "later"}
        await ws.send(json.dumps({**error, "close_code": 1013, "retry_after": retry_after}))
        await ws.close(1013, "try again later")
        return
    await ws.send(json.dumps(WELCOME))
    await ws.wait_closed()


async def delays_until_welcomed(
    server: Any, initial_delay: float, timeout: float
) -> list[tuple[int | None, float]]:
    """Run a client against ``server`` until it is welcomed; return its reconnect delays."""
    delays: list[tuple[int | None, float]] = []
    client = Client(
        url(server.sockets[0].getsockname()[1]),
        CALLER,
        initial_delay=initial_delay,
        on_reconnecting=lambda c, d: delays.append((c, d)),
    )
    runner = asyncio.create_task(client.run())
    await asyncio.wait_for(client.connected.wait(), timeout)
    await client.aclose()
    await runner
    return delays


async def test_the_python_client_honours_retry_after() -> None:
    """Shed at hello with 1013 and retry_after, the Python client waits at least that long
    (not its 10 ms backoff) before it comes back."""
    attempts: list[float] = []

    async def overloaded_once(ws: ServerConnection) -> None:
        attempts.append(time.monotonic())
        await shed_or_welcome(ws, 0.6 if len(attempts) == 1 else None)

    async with serve(overloaded_once, "127.0.0.1", 0) as server:
        delays = await delays_until_welcomed(server, 0.01, 5)
    assert delays == [(1013, 0.6)]
    assert attempts[1] - attempts[0] >= 0.6


WELCOME = {
    "type": "welcome",
    "protocol": 1,
    "session_id": "s_1",
    "resumed": False,
    "state": {},
    "version": 0,
    "seq": 0,
    "replay": "full",
    "resume_token": "t",
}


async def test_a_hint_restarts_the_backoff() -> None:
    """After attempts that failed while the gateway was unreachable, a retry_after hint is
    the next delay: the backoff grown meanwhile starts again from its first step."""
    attempts: list[int] = []

    def refuse_five(ws: ServerConnection, request: Any) -> Any:
        attempts.append(1)
        if len(attempts) <= 5:
            return ws.respond(500, "down\n")  # no hint: the client backs off
        return None

    async def shed_then_welcome(ws: ServerConnection) -> None:
        await shed_or_welcome(ws, 0.3 if len(attempts) == 6 else None)

    async with serve(shed_then_welcome, "127.0.0.1", 0, process_request=refuse_five) as server:
        delays = await delays_until_welcomed(server, 0.05, 10)
    assert delays[-1] == (1013, 0.3)


async def test_tokens_and_a_fresh_one_after_expiry(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """On a gateway that requires tokens, a static token opens the session; an expired
    static token stops the client with 1008; a token function is called before each hello
    and, after token_expired, reconnects with a fresh token."""
    cfg = config.replace("security", auth_keys=parse_auth_keys(keys_document()))
    async with make_gateway(cfg) as gw:
        static = fast(gw.port, tenant="acme", token=token(CALLER))
        runner = asyncio.create_task(static.run())
        await asyncio.wait_for(static.connected.wait(), 5)
        assert await static.turn("t1", form={"name": "Ada"}) == 1
        await static.aclose()
        await asyncio.wait_for(runner, 5)

        stale = fast(gw.port, tenant="acme", token=token(CALLER, ttl=-120))
        with pytest.raises(ClientClosed) as info:
            await asyncio.wait_for(stale.run(), 5)
        assert info.value.code == 1008

        made: list[float] = []

        async def mint() -> str:
            made.append(time.time())
            return token(CALLER, ttl=-120 if len(made) == 1 else 300)

        renewing = fast(gw.port, tenant="acme", token=mint)
        runner = asyncio.create_task(renewing.run())
        await asyncio.wait_for(renewing.connected.wait(), 5)
        assert renewing.version == 1 and len(made) == 2
        await renewing.aclose()
        await asyncio.wait_for(runner, 5)
