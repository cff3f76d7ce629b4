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
from tests.support.wsclient import Closed, closed, connect, hello, turn, url

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
    error = result.expect(close_code, code)
    assert error["type"] == "error"
    assert error["close_code"] == close_code
    assert error["message"]
    assert errors(gateway, code) == 1
    ack = await turn(bystander, "b2", form={"after": True})
    assert ack == {"type": "ack", "turn_id": "b2", "version": 2}
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, PHONE)
    # Nothing the bad connection sent reached the store.
    assert (again["version"], again["state"]["form_answers"]) == (0, {})
    return result


def sends(data: str | bytes) -> Callable[[ClientConnection], Awaitable[None]]:
    """Send ``data``: a text frame, or a binary one for bytes."""

    async def act(ws: ClientConnection) -> None:
        await ws.send(data)

    return act


def message(msg: dict[str, Any]) -> Callable[[ClientConnection], Awaitable[None]]:
    return sends(json.dumps(msg))


@pytest.mark.parametrize(
    ("act", "code", "close_code", "after_hello"),
    [
        # Not JSON.
        pytest.param(sends('{"type": "hello",'), "invalid_json", 1007, False, id="invalid_json"),
        # A binary frame.
        pytest.param(
            sends(json.dumps({"type": "hello", "caller": PHONE}).encode()),
            "unsupported_data",
            1003,
            False,
            id="binary_frame",
        ),
        # An unknown message type.
        pytest.param(
            message({"type": "dance", "caller": PHONE}),
            "unknown_type",
            1008,
            False,
            id="unknown_type",
        ),
        # A turn before hello, which is not stored either.
        pytest.param(
            message({"type": "turn", "turn_id": "t1", "form": {"x": 1}}),
            "unexpected_message",
            1008,
            False,
            id="turn_before_hello",
        ),
        # A turn without turn_id.
        pytest.param(
            message({"type": "turn", "form": {"x": 1}}),
            "invalid_message",
            1007,
            True,
            id="missing_field",
        ),
        # A turn whose form is not an object: no write either.
        pytest.param(
            message({"type": "turn", "turn_id": "t1", "form": "Ada"}),
            "invalid_message",
            1007,
            True,
            id="wrongly_typed_field",
        ),
        # A frame over --max-message-size.
        pytest.param(
            message({"type": "turn", "turn_id": "t1", "text": "a" * 70_000}),
            "message_too_big",
            1009,
            True,
            id="oversized_frame",
        ),
    ],
)
async def test_bad_frame(
    gateway: Gateway,
    bystander: ClientConnection,
    act: Callable[[ClientConnection], Awaitable[None]],
    code: str,
    close_code: int,
    after_hello: bool,
) -> None:
    """A frame that is not JSON (1007), binary (1003), of an unknown type or a turn before
    hello (1008), a turn missing a field or with a wrongly typed one (1007), or over
    --max-message-size (1009) gets its error code and close code."""
    await check(gateway, bystander, act, code=code, close_code=close_code, after_hello=after_hello)


async def test_invalid_utf8_in_text_frame(gateway: Gateway, bystander: ClientConnection) -> None:
    """A text frame that is not UTF-8 is refused by websockets with 1007 (RFC 6455 8.1)."""

    async def act(ws: ClientConnection) -> None:
        await ws.send(b'{"type":"\xff"}', text=True)

    async with connect(url(gateway.port)) as ws:
        await act(ws)
        result = await closed(ws)
    assert result.code == 1007
    assert (await turn(bystander, "b2"))["version"] == 2


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
    act = sends('{"type":"turn","turn_id":"t1","form":{"k":' + deep + "}}")
    result = await check(
        gateway, bystander, act, code="invalid_message", close_code=1007, after_hello=True
    )
    assert result.error is not None and "nests deeper than 32" in result.error["message"]
