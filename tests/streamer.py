"""A caller that streams turns through faults: it reconnects on any drop, resumes with its
token and ``last_seq``, re-sends the turn in flight, and records every broken promise.

What it checks, each a problem naming the caller:

- every welcome after the first resumes the same session (``resumed``, same ID, replay
  ``full``) and its state holds every acknowledged turn's answer;
- a turn ID acknowledged twice (a re-send after a drop) carries the same version both
  times: a different one would mean it was applied twice;
- agent messages arrive numbered ``last_seq + 1``, each exactly once;
- the gateway never closes with a code that says "do not come back" (4500-4999).
"""

from __future__ import annotations

import asyncio
import json
import random
from collections import Counter
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

__all__ = ["Streamer"]


class Streamer:
    """One caller streaming ``text`` turns through ``url`` until :meth:`stop`."""

    def __init__(self, url: str, caller: dict[str, Any], *, pace: float = 0.3) -> None:
        self.url = url
        self.caller = caller
        self.pace = pace
        self.name = f"{caller.get('user_id')}/{caller.get('call_id')}"
        self.token: str | None = None
        self.session_id: str | None = None
        self.last_seq = 0
        self.acked: dict[str, int] = {}
        """Turn ID to the version its ack named."""
        self.answers: dict[str, int] = {}
        """Form answers of the acknowledged turns."""
        self.messages = 0
        self.welcomes = 0
        self.closes: Counter[int | None] = Counter()
        self.problems: list[str] = []
        self.instances: list[str] = []
        self._stop = asyncio.Event()
        self._next = 1
        self._ws: ClientConnection | None = None

    def stop(self) -> None:
        """Finish the turn in flight (until acked), then close (without bye)."""
        self._stop.set()

    async def verify(self) -> None:
        """Connect once more and check what the welcome restores (see the module doc)."""
        async with connect(self.url, open_timeout=5, close_timeout=1) as ws:
            await self._hello(ws)

    async def run(self) -> None:
        """Talk until stopped; reconnect after every drop with jittered backoff."""
        delay = 0.05
        while True:
            try:
                async with connect(self.url, open_timeout=5, close_timeout=1) as ws:
                    self._ws = ws
                    await self._hello(ws)
                    delay = 0.05
                    if await self._talk(ws):
                        return
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                self.closes[code] += 1
                if code is not None and 4500 <= code <= 4999:
                    self.problems.append(f"{self.name}: closed with terminal {code}")
                    return
            except (OSError, TimeoutError, InvalidStatus):
                pass
            finally:
                self._ws = None
            await asyncio.sleep(random.uniform(0, delay))
            delay = min(delay * 2, 1.0)

    def abort(self) -> None:
        """Drop the connection without a close frame, as a network blip would."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _hello(self, ws: ClientConnection) -> None:
        hello: dict[str, Any] = {"type": "hello", "caller": self.caller, "last_seq": self.last_seq}
        if self.token is not None:
            hello["resume_token"] = self.token
        await ws.send(json.dumps(hello))
        welcome = await self._recv(ws)
        if welcome.get("type") != "welcome":
            while True:  # an error frame: read until the close it announces
                await asyncio.wait_for(ws.recv(), 30)
        self.welcomes += 1
        if self.session_id is not None:
            if welcome["session_id"] != self.session_id or not welcome["resumed"]:
                self.problems.append(f"{self.name}: resumed into another session {welcome}")
            if welcome.get("replay") != "full":
                self.problems.append(f"{self.name}: replay {welcome.get('replay')}")
            held = welcome["state"].get("form_answers", {})
            lost = {k: v for k, v in self.answers.items() if held.get(k) != v}
            if lost:
                self.problems.append(f"{self.name}: acked answers lost {sorted(lost)}")
        self.session_id = welcome["session_id"]
        self.token = welcome["resume_token"]

    async def _talk(self, ws: ClientConnection) -> bool:
        """Send turns, each after the previous one's ack; return True once stopped."""
        while True:
            if self._stop.is_set() and str(self._next) in self.acked:
                return True
            n = self._next
            turn_id = str(n)
            await ws.send(
                json.dumps(
                    {
                        "type": "turn",
                        "turn_id": turn_id,
                        "text": f"answer {n}",
                        "form": {f"k{n}": n},
                    }
                )
            )
            while True:
                frame = await self._recv(ws)
                if frame.get("type") == "ack" and frame["turn_id"] == turn_id:
                    break
            version = frame["version"]
            if self.acked.setdefault(turn_id, version) != version:
                self.problems.append(
                    f"{self.name}: turn {turn_id} acked as {self.acked[turn_id]} then {version}"
                )
            self.answers[f"k{n}"] = n
            if not self._stop.is_set():
                self._next += 1
                await asyncio.sleep(self.pace * random.uniform(0.5, 1.5))

    async def _recv(self, ws: ClientConnection) -> dict[str, Any]:
        """The next frame that is not an agent message; agent messages are checked and acked."""
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if frame.get("type") == "msg":
                if frame["seq"] != self.last_seq + 1:
                    self.problems.append(
                        f"{self.name}: message {frame['seq']} after {self.last_seq}"
                    )
                self.last_seq = max(self.last_seq, frame["seq"])
                self.messages += 1
                await ws.send(json.dumps({"type": "ack", "seq": self.last_seq}))
                continue
            if frame.get("type") == "state":
                continue
            return dict(frame)
