"""Bad input: an error frame, the right close code, a metric, and no harm to anyone else.

Each test keeps a bystander session open on the same gateway and checks that it
still works and kept its state after the bad connection was thrown out.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from gateway.server import Gateway
from tests.support.gwmetrics import errors
from tests.support.wsclient import Closed, closed, connect, hello, send, turn, url

PHONE = {"phone": "+14155550100", "call_id": "bad-1"}
BYSTANDER = {"user_id": "bystander", "call_id": "b-1"}


@pytest.fixture
async def bystander(gateway: Gateway) -> AsyncIterator[ClientConnection]:
    async with connect(url(gateway.port)) as ws:
        await hello(ws, BYSTANDER)
        await turn(ws, "b1", form={"name": "Bystander"})
        yield ws


async def check(
    gateway: Gateway,
    bystander: ClientConnection,
    act: Callable[[ClientConnection], Awaitable[None]],
    *,
    code: str,
    close_code: int,
    after_hello: bool = False,
) -> Closed:
    """Run ``act`` on a fresh connection and check what follows."""
    async with connect(url(gateway.port), max_size=None) as ws:
        if after_hello:
            await hello(ws, PHONE)
        await act(ws)
        result = await closed(ws)
    assert result.code == close_code
    assert result.error is not None
    assert result.error["type"] == "error"
    assert result.error["code"] == code
    assert result.error["close_code"] == close_code
    assert result.error["message"]
    assert errors(gateway, code) == 1
    ack = await turn(bystander, "b2", form={"after": True})
    assert ack == {"type": "ack", "turn_id": "b2", "version": 2}
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE)
    # Nothing the bad connection sent reached the store.
    assert (again["version"], again["state"]["form_answers"]) == (0, {})
    return result


def text(data: str) -> Callable[[ClientConnection], Awaitable[None]]:
    async def act(ws: ClientConnection) -> None:
        await ws.send(data)

    return act


def message(msg: dict[str, Any]) -> Callable[[ClientConnection], Awaitable[None]]:
    async def act(ws: ClientConnection) -> None:
        await send(ws, msg)

    return act


async def test_invalid_json(gateway: Gateway, bystander: ClientConnection) -> None:
    """A frame that is not JSON gets invalid_json and close 1007."""
    await check(gateway, bystander, text('{"type": "hello",'), code="invalid_json", close_code=1007)


async def test_invalid_utf8_in_text_frame(gateway: Gateway, bystander: ClientConnection) -> None:
    """A text frame that is not UTF-8 is refused by websockets with 1007 (RFC 6455 8.1)."""

    async def act(ws: ClientConnection) -> None:
        await ws.send(b'{"type":"\xff"}', text=True)

    async with connect(url(gateway.port)) as ws:
        await act(ws)
        result = await closed(ws)
    assert result.code == 1007
    assert (await turn(bystander, "b2"))["version"] == 2


async def test_binary_frame(gateway: Gateway, bystander: ClientConnection) -> None:
    """A binary frame gets unsupported_data and close 1003."""

    async def act(ws: ClientConnection) -> None:
        await ws.send(json.dumps({"type": "hello", "caller": PHONE}).encode())

    await check(gateway, bystander, act, code="unsupported_data", close_code=1003)


async def test_unknown_type(gateway: Gateway, bystander: ClientConnection) -> None:
    """An unknown message type gets unknown_type and close 1008."""
    await check(
        gateway,
        bystander,
        message({"type": "dance", "caller": PHONE}),
        code="unknown_type",
        close_code=1008,
    )


async def test_turn_before_hello(gateway: Gateway, bystander: ClientConnection) -> None:
    """A turn before hello gets unexpected_message and close 1008, and is not stored."""
    await check(
        gateway,
        bystander,
        message({"type": "turn", "turn_id": "t1", "form": {"x": 1}}),
        code="unexpected_message",
        close_code=1008,
    )


async def test_missing_field(gateway: Gateway, bystander: ClientConnection) -> None:
    """A turn without turn_id gets invalid_message and close 1007."""
    await check(
        gateway,
        bystander,
        message({"type": "turn", "form": {"x": 1}}),
        code="invalid_message",
        close_code=1007,
        after_hello=True,
    )


async def test_wrongly_typed_field(gateway: Gateway, bystander: ClientConnection) -> None:
    """A turn whose form is not an object gets invalid_message and close 1007, and no write."""
    await check(
        gateway,
        bystander,
        message({"type": "turn", "turn_id": "t1", "form": "Ada"}),
        code="invalid_message",
        close_code=1007,
        after_hello=True,
    )


async def test_oversized_frame(gateway: Gateway, bystander: ClientConnection) -> None:
    """A frame over --max-message-size gets message_too_big and close 1009."""
    big = {"type": "turn", "turn_id": "t1", "text": "a" * 70_000}
    await check(
        gateway,
        bystander,
        message(big),
        code="message_too_big",
        close_code=1009,
        after_hello=True,
    )


async def test_huge_frame_refused_by_websockets(
    gateway: Gateway, bystander: ClientConnection
) -> None:
    """A frame over twice the limit is cut off by websockets with 1009, and still counted."""
    async with connect(url(gateway.port), max_size=None) as ws:
        await ws.send("a" * 200_000)
        result = await closed(ws)
    assert result.code == 1009
    assert (await turn(bystander, "b2"))["version"] == 2
    for _ in range(100):
        if errors(gateway, "message_too_big") == 1:
            break
        await asyncio.sleep(0.01)
    assert errors(gateway, "message_too_big") == 1


async def test_bad_phone_number(gateway: Gateway, bystander: ClientConnection) -> None:
    """A hello with an unparsable phone number gets invalid_caller and close 1008."""
    result = await check(
        gateway,
        bystander,
        message({"type": "hello", "caller": {"phone": "555", "call_id": "c"}}),
        code="invalid_caller",
        close_code=1008,
    )
    assert result.error is not None and "phone" in result.error["message"]
    assert "555" not in result.error["message"]


async def test_too_deeply_nested_turn(gateway: Gateway, bystander: ClientConnection) -> None:
    """A small turn nested past 32 levels is invalid_message, 1007, not an internal error
    (orjson reads 1024 levels but writes only 255, so it could never be stored)."""
    deep = "[" * 260 + "]" * 260

    async def act(ws: ClientConnection) -> None:
        await ws.send('{"type":"turn","turn_id":"t1","form":{"k":' + deep + "}}")

    result = await check(
        gateway, bystander, act, code="invalid_message", close_code=1007, after_hello=True
    )
    assert result.error is not None and "nests deeper than 32" in result.error["message"]
