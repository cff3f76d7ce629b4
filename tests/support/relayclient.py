"""A test client that checks exactly-once, in-order delivery of agent messages."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

__all__ = ["Caller"]


class Caller:
    """One caller across any number of connections, keeping ``resume_token`` and ``last_seq``
    as a client library would, and asserting that every message arrives once, in order."""

    def __init__(self, url: str, caller: dict[str, Any], *, ack: bool = True) -> None:
        self.url = url
        self.caller = caller
        self.ack = ack
        self.token: str | None = None
        self.session_id: str | None = None
        self.last_seq = 0
        self.messages: list[dict[str, Any]] = []
        """Every message's data, in sequence order, each exactly once."""
        self.ws: ClientConnection | None = None

    async def connect(self) -> dict[str, Any]:
        """Open a connection and send hello; return the welcome."""
        self.ws = await connect(self.url)
        hello: dict[str, Any] = {"type": "hello", "caller": self.caller, "last_seq": self.last_seq}
        if self.token is not None:
            hello["resume_token"] = self.token
        await self.ws.send(json.dumps(hello))
        welcome = await self._recv()
        assert welcome["type"] == "welcome", welcome
        if welcome["session_id"] != self.session_id:
            self.last_seq = 0  # a new session numbers its messages from 1
        if welcome["replay"] == "partial":
            self.last_seq = welcome["replay_from"] - 1  # the gap is announced, not hidden
        self.token = welcome["resume_token"]
        self.session_id = welcome["session_id"]
        return welcome

    async def _recv(self, timeout: float = 5) -> dict[str, Any]:
        assert self.ws is not None
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), timeout))
        if frame["type"] == "msg":
            assert frame["seq"] == self.last_seq + 1, (frame["seq"], self.last_seq)
            self.last_seq = frame["seq"]
            self.messages.append(frame["data"])
            if self.ack:
                await self.ws.send(json.dumps({"type": "ack", "seq": frame["seq"]}))
        return frame

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5
    ) -> dict[str, Any]:
        """Read frames (checking messages on the way) until one satisfies ``predicate``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self._recv(timeout)
                if predicate(frame):
                    return frame

    async def asks(self, field: str | None, timeout: float = 5) -> dict[str, Any]:
        """Read until the agent asks for ``field`` (``None``: the booking is done)."""
        frame = await self.until(
            lambda f: f["type"] == "msg" and f["data"].get("field", "-") == field, timeout
        )
        return frame

    async def turn(self, turn_id: str, text: str) -> dict[str, Any]:
        """Send a turn and read until its ack."""
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": "turn", "turn_id": turn_id, "text": text}))
        return await self.until(lambda f: f["type"] == "ack" and f["turn_id"] == turn_id)

    def drop(self) -> None:
        """Lose the connection without a close frame, as a network drop does."""
        assert self.ws is not None
        self.ws.transport.abort()
        self.ws = None

    async def aclose(self) -> None:
        if self.ws is not None:
            await self.ws.close()
            self.ws = None
