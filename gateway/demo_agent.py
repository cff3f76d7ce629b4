"""A demo voice agent: books an appointment over four questions.

It speaks the downstream protocol (:mod:`gateway.core.agent`) and keeps
nothing of its own: the form lives in the session state, which the gateway
pushes on ``session.start`` and ``session.resume``. Each answer is recorded
with a ``state`` patch that also names the turn it answered
(``context.agent_turn``), so after any drop the agent knows whether the last
turn in the state was handled: it answers it if not, and otherwise asks the
next unanswered question.

A phone caller's audio (``media`` frames, from a Twilio stream) is echoed
back as it comes, with a ``mark`` after every second of it: enough to hear the
relay work end to end, and to see the echo move to a re-attached stream.

``hangon serve`` runs it in-process when no ``--downstream`` is given;
``hangon demo-agent`` runs it on its own, to stand in for a real backend.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

__all__ = ["FIELDS", "BookingForm", "serve_demo_agent"]

log = logging.getLogger("gateway.demo_agent")

FIELDS: tuple[tuple[str, str], ...] = (
    ("name", "What name should I book the appointment under?"),
    ("date", "What day would you like to come in?"),
    ("reason", "What is the reason for your visit?"),
    ("confirm", "Shall I book it? Please say yes or no."),
)
"""The questions, in the order they are asked: (answer key, prompt)."""

_YES = {"yes", "y", "yeah", "yep", "sure", "correct", "confirm"}
_NO = {"no", "n", "nope", "cancel"}


class BookingForm:
    """The form logic of one session, without I/O: frames in, frames out."""

    def __init__(self) -> None:
        self.answers: dict[str, Any] = {}
        self.handled: str | None = None

    def next_field(self) -> str | None:
        """The first question without an answer, or ``None`` once booked."""
        return next((name for name, _ in FIELDS if name not in self.answers), None)

    def reply(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Answer one frame from the gateway (nothing for frames that need no answer)."""
        if frame.get("type") in ("session.start", "session.resume"):
            return self.open(frame)
        if frame.get("type") == "turn":
            return self.turn(frame)
        return []

    def open(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Answer ``session.start`` or ``session.resume``: pick up where the state stands."""
        state = frame.get("state") or {}
        answers = state.get("form_answers") or {}
        self.answers = {name: answers[name] for name, _ in FIELDS if name in answers}
        self.handled = (state.get("context") or {}).get("agent_turn")
        last = state.get("last_turn") or {}
        if last.get("turn_id") and last["turn_id"] != self.handled and last.get("text"):
            # A turn the agent never answered (its link was down): answer it now.
            return self.turn(last)
        if frame.get("type") == "session.start":
            return [self._ask("Hi! I can book you an appointment.")]
        return [self._ask("Welcome back.")]

    def turn(self, frame: dict[str, Any]) -> list[dict[str, Any]]:
        """Record the turn's text as the answer to the current question."""
        turn_id = frame.get("turn_id")
        text = str(frame.get("text") or "").strip()
        field = self.next_field()
        if field is None:
            return [_say("Your appointment is already booked. Goodbye!", None)]
        if not text:
            return [self._ask("Sorry, I did not catch that.")]
        patch: dict[str, Any] = {"context": {"agent_turn": turn_id}}
        self.handled = turn_id
        if field == "confirm":
            word = text.lower().strip(".! ")
            if word in _NO:
                patch["form_answers"] = {name: None for name, _ in FIELDS}
                self.answers = {}
                return [_state(patch), self._ask("No problem, let us start over.")]
            if word not in _YES:
                return [self._ask("Sorry, was that a yes or a no?")]
            text = "yes"
        self.answers[field] = text
        patch["form_answers"] = {field: text}
        if self.next_field() is None:
            a = self.answers
            done = f"Booked: {a['name']} on {a['date']} for {a['reason']}. Goodbye!"
            return [_state(patch), _say(done, None)]
        return [_state(patch), self._ask(f"Got it: {text}.")]

    def _ask(self, lead: str) -> dict[str, Any]:
        field = self.next_field()
        if field is None:
            return _say(f"{lead} Your appointment is booked.", None)
        return _say(f"{lead} {dict(FIELDS)[field]}", field)


def _say(text: str, field: str | None) -> dict[str, Any]:
    return {"type": "say", "text": text, "field": field}


def _state(patch: dict[str, Any]) -> dict[str, Any]:
    return {"type": "state", "patch": patch}


async def _handle(ws: ServerConnection) -> None:
    form = BookingForm()
    try:
        async for raw in ws:
            try:
                frame = json.loads(raw)
                kind = frame["type"]
            except (ValueError, TypeError, KeyError):
                log.warning("demo agent: ignoring a malformed frame")
                continue
            if kind == "session.end":
                await ws.close(1000, "session ended")
                return
            if kind == "media":
                await ws.send(json.dumps({"type": "media", "payload": frame.get("payload")}))
                chunk = frame.get("chunk")
                if isinstance(chunk, int) and chunk % 50 == 0:
                    await ws.send(json.dumps({"type": "mark", "name": f"echo-{chunk}"}))
                continue
            if kind == "error":
                log.warning("demo agent: the gateway rejected a frame: %s", frame)
            for reply in form.reply(frame):
                await ws.send(json.dumps(reply))
    except ConnectionClosed:
        pass


async def serve_demo_agent(host: str = "127.0.0.1", port: int = 0) -> Server:
    """Start the demo agent's WebSocket server; the caller closes it."""
    # Every live session opens a connection: after a reconnect storm, thousands at once.
    return await serve(_handle, host, port, compression=None, backlog=2048)
