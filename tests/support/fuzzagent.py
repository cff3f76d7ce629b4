"""A voice agent that answers each session with frames a test drew, in a thread of its own.

The fuzz tests drive the gateway with a synchronous client, one example after another; the
agent runs a websockets server on its own event loop in a background thread. A test scripts
a session before it opens it (:meth:`FuzzAgent.script`, keyed by the call ID, which is the
example's marker), and on each ``session.start`` or ``session.resume`` of that session the
agent sends the next burst of frames (see :mod:`tests.support.fuzzframes`).

Two things let the test know the gateway has dealt with a burst: the agent answers a turn
whose ``turn_id`` starts with ``fzsync`` (or a ``session.resume`` whose last turn is one)
with a message ``{"type": "fz.sync", "id"}``, and a caller's mark named ``fzsync…`` with
the same mark, always after the burst in hand. The message goes through the gateway's store
behind the burst's frames, so a v1 client that sees it has seen all the burst can cause.

It also checks what the gateway sends it: every frame is JSON, every frame of a connection
names that connection's session, no frame carries another example's marker, and only the
secret's owner's session carries the secret. What fails is kept for
:meth:`FuzzAgent.take_violations`.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, deque
from typing import Any

from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from tests.support.fuzzframes import MARKER, Close, Key, wire

__all__ = ["FuzzAgent"]


class FuzzAgent:
    """The agent; ``secret`` may appear only on the link of ``owner``, a caller as the agent
    sees it (``user_id`` or ``phone``, and ``call_id``).

    Use as a context manager; :attr:`url` is where it listens.
    """

    def __init__(self, *, secret: str, owner: dict[str, str]) -> None:
        self.secret = secret
        self.owner = owner
        self.violations: list[str] = []
        self.counts: Counter[str] = Counter()
        """``sent``: fuzzed frames sent; ``closes``, ``errors`` (error frames received),
        ``opens``, ``syncs``."""
        self.port = 0
        self._lock = threading.Lock()
        self._scripts: dict[str, deque[list[Any]]] = {}
        self._traces: dict[str, list[str]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._failure: BaseException | None = None

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/"

    def script(self, key: str, bursts: list[list[Any]]) -> None:
        """Answer the opening frames of call ``key`` with ``bursts``, one each, in order."""
        with self._lock:
            self._scripts[key] = deque(bursts)
            self._traces[key] = []

    def forget(self, key: str) -> None:
        """Drop what is left of ``key``'s script (the session opened fewer times)."""
        with self._lock:
            self._scripts.pop(key, None)
            self._traces.pop(key, None)

    def take_violations(self) -> list[str]:
        """What the agent found amiss since the last call."""
        with self._lock:
            found, self.violations = self.violations, []
        return found

    def trace(self, key: str) -> list[str]:
        """What the agent received and did on the links of scripted call ``key``."""
        with self._lock:
            return list(self._traces.get(key, []))

    def _note(self, key: str | None, what: str) -> None:
        with self._lock:
            if key in self._traces:
                self._traces[key].append(f"{time.monotonic():.3f} {what}")

    def __enter__(self) -> FuzzAgent:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the fuzz agent did not start: {self._failure!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self, ready: threading.Event) -> None:
        try:
            asyncio.run(self._main(ready))
        except BaseException as exc:  # the test thread reads it in __enter__ or violations
            self._failure = exc
            with self._lock:
                self.violations.append(f"the agent's loop failed: {exc!r}")

    async def _main(self, ready: threading.Event) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with serve(
            self._handle, "127.0.0.1", 0, max_size=None, compression=None, ping_interval=None
        ) as server:
            self.port = server.sockets[0].getsockname()[1]
            ready.set()
            await self._stop.wait()

    def _violation(self, what: str, raw: str | bytes) -> None:
        with self._lock:
            self.violations.append(f"{what}: {raw[:300]!r}")

    async def _handle(self, ws: ServerConnection) -> None:
        key: str | None = None
        caller: dict[str, Any] | None = None
        session: str | None = None
        phone = False
        try:
            async for raw in ws:
                text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
                try:
                    frame = json.loads(raw)
                    kind = frame["type"]
                except (ValueError, KeyError, TypeError):
                    self._violation("the gateway sent a frame that is not a typed object", raw)
                    continue
                if kind in ("session.start", "session.resume"):
                    self.counts["opens"] += 1
                    if session is None:
                        session, caller = frame["session_id"], frame["caller"]
                        key = frame["caller"].get("call_id")
                    elif frame["session_id"] != session or frame["caller"] != caller:
                        self._violation(f"another session on the link of {session}", raw)
                    # An opening names the phone stream if one is connected: sync with a mark.
                    phone = "stream" in frame
                elif "session_id" in frame and frame["session_id"] != session:
                    self._violation(f"a frame for another session on the link of {session}", raw)
                if self.secret in text and not _same(caller, self.owner):
                    self._violation(f"the secret on the link of call {key!r}", raw)
                if any(found != key for found in MARKER.findall(text)):
                    self._violation(f"another example's data on the link of call {key!r}", raw)
                self._note(key, f"link {id(ws) % 10000} got {text[:120]!r}")
                if kind == "error":
                    self.counts["errors"] += 1
                if kind in ("session.start", "session.resume"):
                    if key is not None and not await self._burst(ws, key, phone):
                        return
                    last = frame.get("state", {}).get("last_turn") or {}
                    await self._sync(ws, key, last.get("turn_id"), phone)
                elif kind == "turn":
                    await self._sync(ws, key, frame.get("turn_id"), phone)
                elif kind == "mark":
                    await self._sync(ws, key, frame.get("name"), phone)
        except ConnectionClosed:
            pass

    async def _burst(self, ws: ServerConnection, key: str, phone: bool) -> bool:
        """Send ``key``'s next burst; ``False`` if it ended by hanging up."""
        with self._lock:
            bursts = self._scripts.get(key)
            burst = bursts.popleft() if bursts else []
        for frame in burst:
            self._note(key, f"link {id(ws) % 10000} sends {frame!r}"[:200])
            if isinstance(frame, Close):
                self.counts["closes"] += 1
                await ws.close(frame.code)
                return False
            await ws.send(wire(_tagged(frame), key))
            self.counts["sent"] += 1
        return True

    async def _sync(self, ws: ServerConnection, key: str | None, name: object, phone: bool) -> None:
        if not isinstance(name, str) or not name.startswith("fzsync"):
            return
        self.counts["syncs"] += 1
        self._note(key, f"link {id(ws) % 10000} syncs {name}")
        answer = {"type": "mark", "name": name} if phone else {"type": "fz.sync", "id": name}
        await ws.send(json.dumps(answer))


def _same(caller: dict[str, Any] | None, owner: dict[str, str]) -> bool:
    return caller is not None and all(caller.get(name) == value for name, value in owner.items())


def _tagged(frame: Any) -> Any:
    """``frame`` with the example's marker in it where the gateway passes it on: in a
    message, and in the ``form_answers`` of a state patch."""
    if not isinstance(frame, dict):
        return frame
    patch = frame.get("patch")
    if frame.get("type") == "state" and isinstance(patch, dict):
        answers = patch.get("form_answers")
        if isinstance(answers, dict):
            return {**frame, "patch": {**patch, "form_answers": {**answers, "k": Key()}}}
        return frame
    return {**frame, "k": Key()}
