"""Write a voice agent for hangon: one :class:`Call` per session, typed events, the chores done.

hangon dials the agent, one WebSocket (a *link*) per live session, and speaks the
downstream protocol on it (docs/protocol.md, "Downstream protocol"). This module is
the agent's side of it::

    from gateway.agent import Call, Resume, Start, Turn, serve

    async def bot(call: Call) -> None:
        async for event in call:
            if isinstance(event, Start):
                await call.say("Hi! What is your name?")
            elif isinstance(event, Resume):
                await call.say("Welcome back.")
            elif isinstance(event, Turn):
                await call.patch(form_answers={"name": event.text})
                await call.say(f"Thanks, {event.text}.")

    server = await serve(bot, "127.0.0.1", 8766)   # hangon serve --downstream ws://127.0.0.1:8766/

What it does for the author:

* **The session as it stands.** :attr:`Call.state`, :attr:`Call.version`,
  :attr:`Call.caller` and (for a phone call) :attr:`Call.stream` come from
  ``session.start``/``session.resume`` and follow the turns and the author's own patches.
* **Turns missed while the link was down.** Each answer names the turn it answered in the
  state (``context.agent_turn``: every :meth:`Call.patch` made while handling a turn
  carries it, and a turn handled without one gets a patch of its own). On a resume whose
  ``state.last_turn`` was never answered, that turn follows the :class:`Resume` event as a
  :class:`Turn` with ``missed=True``, so it is answered once, after any drop.
* **The end of a call, told apart from a client away.** ``session.end`` (the caller said
  bye) ends the iteration with :class:`End` ``(over=True)`` and closes the link; a link
  that closes without it ends with :class:`End` ``(over=False)``: the client is away (or
  the gateway drained, or lost the session), and the session may resume on a new link.
* **Bounded waits.** Every send waits ``send_timeout`` seconds at most for hangon to read.

Events: :class:`Start`, :class:`Resume`, :class:`Turn`, :class:`Media`, :class:`Mark`,
:class:`Rejected` (hangon refused one of the agent's frames) and :class:`End`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.exceptions import ConnectionClosed

__all__ = [
    "Call",
    "End",
    "Event",
    "Handler",
    "Mark",
    "Media",
    "Rejected",
    "Resume",
    "Start",
    "Turn",
    "serve",
]

log = logging.getLogger("gateway.agent")

_AGENT_TURN = "agent_turn"
"""The ``context`` key that names the last turn the agent answered."""
_QUEUE = 256
"""Events read from hangon and not yet taken by the handler, at most: past that the link
is not read, which holds hangon back (5 s of a phone caller's audio)."""


@dataclass(frozen=True, slots=True)
class Turn:
    """What the caller said (``text``), answered (``form``) or pressed (``dtmf``)."""

    turn_id: str
    version: int
    text: str | None = None
    form: dict[str, Any] | None = None
    context: dict[str, Any] | None = None
    dtmf: str | None = None
    missed: bool = False
    """It arrived while no link was up: it comes from the state of a resume."""


@dataclass(frozen=True, slots=True)
class Start:
    """A new session: the agent has not heard of it before.

    ``missed`` is a turn the caller made before the agent could be reached; it follows
    this event, to be answered (a greeting may then be left out).
    """

    missed: Turn | None = None


@dataclass(frozen=True, slots=True)
class Resume:
    """The session goes on: ``reason`` is ``client_resumed`` (the caller came back) or
    ``agent_reconnected`` (this link was redialled). :attr:`Call.state` says where it stands.

    ``missed`` is the caller's last turn if no answer named it (it came while no link was
    up); it follows this event, to be answered (a "welcome back" may then be left out).
    """

    reason: str
    missed: Turn | None = None


@dataclass(frozen=True, slots=True)
class Media:
    """20 ms of the phone caller's audio: μ-law, 8 kHz, mono."""

    audio: bytes
    chunk: int | None = None
    timestamp: int | None = None
    track: str | None = None


@dataclass(frozen=True, slots=True)
class Mark:
    """The phone played the agent's audio up to its mark ``name``."""

    name: str


@dataclass(frozen=True, slots=True)
class Rejected:
    """hangon refused a frame the agent sent (``code`` as in docs/protocol.md)."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class End:
    """The link is over. ``over``: the caller ended the call (``session.end``); otherwise
    the client is away, and the session may come back on another link."""

    over: bool


Event = Start | Resume | Turn | Media | Mark | Rejected | End


@dataclass(slots=True)
class Call:
    """One session's link from hangon: its caller and state, its events, and what to say.

    Iterate over it for events; the iteration ends after :class:`End`.
    """

    ws: ServerConnection
    send_timeout: float = 20.0
    session_id: str = ""
    caller: dict[str, str] = field(default_factory=dict)
    """``{"tenant", "phone" or "user_id", "call_id"}``."""
    state: dict[str, Any] = field(default_factory=dict)
    """``{"form_answers", "context", "last_turn"}``, as the gateway last said, with the
    agent's own patches merged in."""
    version: int = 0
    stream: dict[str, Any] | None = None
    """The phone stream, on a phone call (``streamSid``, ``callSid``, ``mediaFormat``...)."""
    data: dict[str, Any] = field(default_factory=dict)
    """The author's own, for this link (a pipeline, a form in progress)."""
    answering: str | None = None
    """The turn being handled: patches name it as answered."""
    _answered: bool = False
    _events: asyncio.Queue[Event] = field(default_factory=lambda: asyncio.Queue(_QUEUE))

    @property
    def phone(self) -> bool:
        """Whether the session is a phone call (media, mark and clear go to the caller)."""
        return self.stream is not None

    @property
    def form_answers(self) -> dict[str, Any]:
        return dict(self.state.get("form_answers") or {})

    @property
    def context(self) -> dict[str, Any]:
        return dict(self.state.get("context") or {})

    # Sending

    async def send(self, message: dict[str, Any]) -> None:
        """Send a message for the client (stored, numbered and relayed by hangon)."""
        await self._send(message)

    async def say(self, text: str, **fields: Any) -> None:
        """Send ``{"type": "say", "text": text, ...fields}`` for the client."""
        await self._send({"type": "say", "text": text, **fields})

    async def patch(
        self,
        *,
        form_answers: dict[str, Any] | None = None,
        context: dict[str, Any] | None = None,
        answered: str | None = None,
    ) -> None:
        """Change the session state (a ``None`` value deletes a key); while a turn is being
        handled, the patch also records that turn as answered (``answered`` names another:
        see :meth:`receive`)."""
        context = dict(context or {})
        if answered is not None:
            context[_AGENT_TURN] = answered
        elif self.answering is not None:
            context[_AGENT_TURN] = self.answering
            self._answered = True
        patch: dict[str, Any] = {}
        if form_answers:
            patch["form_answers"] = form_answers
        if context:
            patch["context"] = context
        if not patch:
            return
        for name, changes in patch.items():
            merged = dict(self.state.get(name) or {})
            for key, value in changes.items():
                if value is None:
                    merged.pop(key, None)
                else:
                    merged[key] = value
            self.state[name] = merged
        await self._send({"type": "state", "patch": patch})

    async def media(self, audio: bytes) -> None:
        """Play μ-law 8 kHz audio to the phone caller."""
        await self._send({"type": "media", "payload": base64.b64encode(audio).decode()})

    async def mark(self, name: str) -> None:
        """Ask to hear (as a :class:`Mark`) when the phone has played the audio sent so far."""
        await self._send({"type": "mark", "name": name})

    async def clear(self) -> None:
        """Drop the audio the phone has not played yet (the caller interrupted)."""
        await self._send({"type": "clear"})

    async def _send(self, frame: dict[str, Any]) -> None:
        async with asyncio.timeout(self.send_timeout):
            await self.ws.send(json.dumps(frame, separators=(",", ":")))

    # Receiving

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def receive(self) -> Event:
        """The next event, with no chore done for it: for a framework that answers turns
        on its own schedule (a Pipecat pipeline), which names each turn it answered with
        ``patch(answered=turn.turn_id)``. After :class:`End` there is none: do not call again.
        """
        return await self._events.get()

    async def _iterate(self) -> AsyncIterator[Event]:
        while True:
            event = await self._events.get()
            if isinstance(event, Turn):
                self.answering, self._answered = event.turn_id, False
                try:
                    yield event
                finally:
                    await self._answered_turn()
                continue
            yield event
            if isinstance(event, End):
                return

    async def _answered_turn(self) -> None:
        """Record a handled turn as answered, if the handler's patches did not."""
        turn, self.answering = self.answering, None
        if turn is not None and not self._answered and self.ws.state.name == "OPEN":
            with contextlib.suppress(ConnectionClosed, TimeoutError):
                self.answering = turn
                await self.patch()
                self.answering = None

    def _feed(self, frame: dict[str, Any]) -> list[Event]:
        """Turn one frame from hangon into events (the call is over after :class:`End`)."""
        events: list[Event] = []
        kind = frame.get("type")
        if kind in ("session.start", "session.resume"):
            self.session_id = str(frame.get("session_id", ""))
            self.caller = _object(frame.get("caller"))
            self.state = _object(frame.get("state"))
            self.version = _int(frame.get("version"), 0) or 0
            stream = frame.get("stream")
            self.stream = stream if isinstance(stream, dict) else None
            missed = _unanswered(self.state)
            if kind == "session.start":
                events.append(Start(missed))
            else:
                events.append(Resume(str(frame.get("reason", "")), missed))
            if missed is not None:
                events.append(missed)
        elif kind == "turn":
            self.version = _int(frame.get("version"), None) or self.version
            turn = _turn(frame)
            self.state["last_turn"] = {
                k: v for k, v in frame.items() if k in ("turn_id", "text", "form", "dtmf")
            }
            for name in ("form", "context"):
                if isinstance(frame.get(name), dict):
                    key = "form_answers" if name == "form" else "context"
                    self.state[key] = {**(self.state.get(key) or {}), **frame[name]}
            events.append(turn)
        elif kind == "media":
            try:
                audio = base64.b64decode(str(frame.get("payload", "")), validate=True)
            except ValueError:
                return events
            track = frame.get("track")
            events.append(
                Media(
                    audio,
                    _int(frame.get("chunk"), None),
                    _int(frame.get("timestamp"), None),
                    track if isinstance(track, str) else None,
                )
            )
        elif kind == "mark":
            events.append(Mark(str(frame.get("name", ""))))
        elif kind == "error":
            rejected = Rejected(str(frame.get("code", "")), str(frame.get("message", "")))
            log.warning("hangon rejected a frame session=%s %s", self.session_id, rejected)
            events.append(rejected)
        elif kind == "session.end":
            events.append(End(over=True))
        return events


def _turn(frame: dict[str, Any], *, missed: bool = False) -> Turn:
    def optional(name: str, kind: type) -> Any:
        value = frame.get(name)
        return value if isinstance(value, kind) else None

    return Turn(
        turn_id=str(frame.get("turn_id", "")),
        version=_int(frame.get("version"), 0) or 0,
        text=optional("text", str),
        form=optional("form", dict),
        context=optional("context", dict),
        dtmf=optional("dtmf", str),
        missed=missed,
    )


def _object(value: Any) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}


def _int(value: Any, default: int | None) -> int | None:
    """An integer field, which Twilio's fields carry as digits: ``default`` if it is not one."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isdigit() and len(value) < 20:
        return int(value)
    return default


def _unanswered(state: dict[str, Any]) -> Turn | None:
    """The session's last turn, if no answer of the agent's names it."""
    last = state.get("last_turn")
    if not isinstance(last, dict) or not last.get("turn_id"):
        return None
    answered = (state.get("context") or {}).get(_AGENT_TURN)
    if last["turn_id"] == answered:
        return None
    return _turn(last, missed=True)


Handler = Callable[[Call], Awaitable[None]]
"""Serves one call: iterates over it and answers."""


async def _link(handler: Handler, ws: ServerConnection, send_timeout: float) -> None:
    """Serve one link: read hangon's frames into the call's events while ``handler`` runs.

    The link closes when the handler returns or fails (a failure is logged here, once).
    """
    call = Call(ws, send_timeout=send_timeout)
    serving: asyncio.Future[None] = asyncio.ensure_future(handler(call))
    reading = asyncio.create_task(_read(call))
    try:
        await asyncio.wait({serving, reading}, return_when=asyncio.FIRST_COMPLETED)
        if not serving.done():
            # It has its End (or the reader failed): give it a moment to finish.
            await asyncio.wait({serving}, timeout=send_timeout)
    finally:
        for task in (reading, serving):
            task.cancel()  # no-op once done
        await asyncio.wait({reading, serving})
        for task, what in ((serving, "handler"), (reading, "reader")):
            if not task.cancelled() and (exc := task.exception()) is not None:
                log.error("agent %s failed session=%s", what, call.session_id, exc_info=exc)
        await ws.close(1000, "session ended")


async def _read(call: Call) -> None:
    """Feed the call's events, holding hangon back while the handler is behind."""
    over = False
    try:
        async for raw in call.ws:
            try:
                frame = json.loads(raw)
            except (ValueError, RecursionError):
                log.warning("agent: ignoring a frame that is not JSON")
                continue
            if not isinstance(frame, dict):
                continue
            for event in call._feed(frame):
                await call._events.put(event)
                over = isinstance(event, End)
            if over:
                return
    except ConnectionClosed:
        pass
    if not over:
        await call._events.put(End(over=False))


async def serve(
    handler: Handler,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    send_timeout: float = 20.0,
) -> Server:
    """Serve ``handler`` for every link hangon opens; close the returned server to stop.

    Args:
        send_timeout: Seconds a frame may wait for hangon to read it.
    """

    async def link(ws: ServerConnection) -> None:
        await _link(handler, ws, send_timeout)

    # Every live session opens a link: after a reconnect storm, thousands at once.
    return await ws_serve(link, host, port, compression=None, backlog=2048)
