"""Voice agents for tests: a recording agent on 127.0.0.1 with a pluggable reply rule."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gateway.demo_agent import BookingForm

__all__ = ["Reply", "TestAgent", "booking", "phone", "silent"]

Reply = Callable[[dict[str, Any], dict[str, Any]], list[str | bytes | dict[str, Any]]]
"""(frame, per-connection scratch) -> frames to send back."""


def silent(frame: dict[str, Any], scratch: dict[str, Any]) -> list[str | bytes | dict[str, Any]]:
    """Say nothing."""
    return []


def booking(frame: dict[str, Any], scratch: dict[str, Any]) -> list[str | bytes | dict[str, Any]]:
    """Answer as the demo agent does (its form logic over raw frames, as gateway.agent
    would drive it: a missed turn answered in place of a greeting, each answer's patch
    naming its turn)."""
    kind = frame["type"]
    if kind in ("session.start", "session.resume"):
        state = frame.get("state") or {}
        scratch["answers"] = dict(state.get("form_answers") or {})
        last = state.get("last_turn") or {}
        if last.get("turn_id") and last["turn_id"] != (state.get("context") or {}).get(
            "agent_turn"
        ):
            return _answer(scratch, last)
        lead = "Hi! I can book you an appointment." if kind == "session.start" else "Welcome back."
        return [BookingForm(scratch["answers"]).ask(lead)]
    if kind == "turn":
        return _answer(scratch, frame)
    return []


def _answer(scratch: dict[str, Any], turn: dict[str, Any]) -> list[str | bytes | dict[str, Any]]:
    form = BookingForm(scratch["answers"])
    changes, reply = form.turn(turn.get("text") or "")
    scratch["answers"] = form.answers
    patch: dict[str, Any] = {"context": {"agent_turn": turn["turn_id"]}}
    if changes is not None:
        patch["form_answers"] = changes
        return [{"type": "state", "patch": patch}, reply]
    return [reply, {"type": "state", "patch": patch}]


def phone(frame: dict[str, Any], scratch: dict[str, Any]) -> list[str | bytes | dict[str, Any]]:
    """A phone agent: echo the caller's audio, and keep the keys pressed in the form, each
    answered with a mark after its state patch."""
    kind = frame["type"]
    if kind == "media":
        return [{"type": "media", "payload": frame["payload"]}]
    if kind in ("session.start", "session.resume"):
        scratch["digits"] = frame["state"]["form_answers"].get("digits", "")
    if kind == "turn" and "dtmf" in frame:
        scratch["digits"] += frame["dtmf"]
        return [
            {"type": "state", "patch": {"form_answers": {"digits": scratch["digits"]}}},
            {"type": "mark", "name": f"heard-{frame['turn_id']}"},
        ]
    return []


class TestAgent:
    """A WebSocket voice agent that records every frame it receives, in order."""

    __test__ = False  # not a pytest class

    def __init__(self, reply: Reply = silent, *, port: int = 0) -> None:
        self.reply = reply
        self.wanted_port = port
        self.received: list[dict[str, Any]] = []
        self.connections: list[ServerConnection] = []
        self.server: Server | None = None
        self._changed = asyncio.Event()

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    async def __aenter__(self) -> TestAgent:
        self.server = await serve(self._handle, "127.0.0.1", self.wanted_port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, ws: ServerConnection) -> None:
        self.connections.append(ws)
        scratch: dict[str, Any] = {}
        try:
            async for raw in ws:
                frame = json.loads(raw)
                self.received.append(frame)
                self._changed.set()
                for out in self.reply(frame, scratch):
                    await ws.send(out if isinstance(out, str | bytes) else json.dumps(out))
        except ConnectionClosed:
            pass

    async def send(self, *frames: str | bytes | dict[str, Any]) -> None:
        """Send ``frames`` on the newest connection."""
        ws = self.connections[-1]
        for out in frames:
            await ws.send(out if isinstance(out, str | bytes) else json.dumps(out))

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.received if f["type"] == kind]

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 5
    ) -> None:
        """Wait until ``predicate(received)`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate(self.received):
                self._changed.clear()
                await self._changed.wait()
