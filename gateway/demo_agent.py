"""A demo voice agent: books an appointment over four questions.

It is written on :mod:`gateway.agent` and keeps nothing of its own: the form lives
in the session state, which the gateway pushes on ``session.start`` and
``session.resume``. Each answer is a ``state`` patch, which the library marks with
the turn it answered (``context.agent_turn``), so after any drop a turn the agent
never answered is answered once, and otherwise it asks the next unanswered question.

A phone caller's audio (``media`` frames, from a Twilio stream) is echoed back as it
comes, with a ``mark`` after every second of it: enough to hear the relay work end to
end, and to see the echo move to a re-attached stream.

``hangon serve`` runs it in-process when no ``--downstream`` is given;
``hangon demo-agent`` runs it on its own, to stand in for a real backend.
"""

from __future__ import annotations

import logging
from typing import Any

from websockets.asyncio.server import Server

from gateway import agent
from gateway.agent import Call, Media, Resume, Start, Turn

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
    """The form logic of one call, without I/O: the answers so far in, what to say out."""

    def __init__(self, answers: dict[str, Any]) -> None:
        self.answers = {name: answers[name] for name, _ in FIELDS if name in answers}

    def next_field(self) -> str | None:
        """The first question without an answer, or ``None`` once booked."""
        return next((name for name, _ in FIELDS if name not in self.answers), None)

    def turn(self, text: str) -> tuple[dict[str, Any] | None, dict[str, Any]]:
        """Take ``text`` as the answer to the current question: the ``form_answers`` patch
        to make (``None``: none) and what to say."""
        text = text.strip()
        field = self.next_field()
        if field is None:
            return None, _say("Your appointment is already booked. Goodbye!", None)
        if not text:
            return None, self.ask("Sorry, I did not catch that.")
        if field == "confirm":
            word = text.lower().strip(".! ")
            if word in _NO:
                self.answers = {}
                return {name: None for name, _ in FIELDS}, self.ask(
                    "No problem, let us start over."
                )
            if word not in _YES:
                return None, self.ask("Sorry, was that a yes or a no?")
            text = "yes"
        self.answers[field] = text
        if self.next_field() is None:
            a = self.answers
            done = f"Booked: {a['name']} on {a['date']} for {a['reason']}. Goodbye!"
            return {field: text}, _say(done, None)
        return {field: text}, self.ask(f"Got it: {text}.")

    def ask(self, lead: str) -> dict[str, Any]:
        """Say ``lead`` and the next question."""
        field = self.next_field()
        if field is None:
            return _say(f"{lead} Your appointment is booked.", None)
        return _say(f"{lead} {dict(FIELDS)[field]}", field)


def _say(text: str, field: str | None) -> dict[str, Any]:
    return {"type": "say", "text": text, "field": field}


async def book(call: Call) -> None:
    """Serve one call: greet or pick up where the state stands, then take the answers."""
    async for event in call:
        if isinstance(event, Media):
            # The caller's audio straight back, and a mark after every second of it.
            await call.media(event.audio)
            if event.chunk is not None and event.chunk % 50 == 0:
                await call.mark(f"echo-{event.chunk}")
        elif isinstance(event, Turn):
            form = BookingForm(call.form_answers)
            patch, reply = form.turn(event.text or "")
            if patch is not None:
                await call.patch(form_answers=patch)
            await call.send(reply)
        elif isinstance(event, Start | Resume) and event.missed is None:
            # A missed turn follows instead, and its answer asks the next question.
            lead = (
                "Hi! I can book you an appointment."
                if isinstance(event, Start)
                else "Welcome back."
            )
            await call.send(BookingForm(call.form_answers).ask(lead))


async def serve_demo_agent(host: str = "127.0.0.1", port: int = 0) -> Server:
    """Start the demo agent's WebSocket server; the caller closes it."""
    return await agent.serve(book, host, port)
