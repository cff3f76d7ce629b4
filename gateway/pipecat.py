"""Put a Pipecat bot behind hangon: a transport per session link, and its context kept.

Install with ``pip install 'hangon[pipecat]'``. hangon dials the bot once per live
session (docs/protocol.md, "Downstream protocol"); :func:`serve` answers each link with
a :class:`HangonTransport` and runs the bot's pipeline on it::

    from gateway.pipecat import HangonTransport, serve

    async def bot(transport: HangonTransport) -> None:
        context = LLMContext(transport.messages or [{"role": "system", "content": PROMPT}])
        user, assistant = LLMContextAggregatorPair(context)
        pipeline = Pipeline([transport.input(), stt, user, llm, tts, transport.output(),
                             assistant, transport.saver(context)])
        worker = PipelineWorker(pipeline, params=transport.pipeline_params())

        @transport.event_handler("on_session_ready")
        async def ready(transport, missed):
            if missed is None:  # greet a new caller, or pick up where the call stood
                await worker.queue_frames([LLMRunFrame()])

        await transport.run(worker)

    await serve(bot, "127.0.0.1", 8766)   # hangon serve --downstream ws://127.0.0.1:8766/

What goes where, as Pipecat's own telephony transports do it:

* **In:** the phone caller's audio (μ-law 8 kHz) as :class:`InputAudioRawFrame` at the
  pipeline's rate; a key press as :class:`InputDTMFFrame`; a text turn (a browser
  client's) as a final :class:`TranscriptionFrame`.
* **Out:** the bot's audio as μ-law ``media`` to the call's stream, paced as a phone
  plays it, and a ``mark`` after each utterance; an :class:`InterruptionFrame` as ``clear``; an
  :class:`OutputTransportMessageFrame` as one frame to hangon (``{"type": "mark",
  "name": ...}`` is a mark; any other message is stored and relayed to the client).
* **The conversation:** :attr:`HangonTransport.messages` holds the LLM messages as the
  session's state last had them (``context.pipecat.messages``), so the pipeline starts
  from them on every link: after a drop, on this gateway or another, the bot goes on
  instead of greeting again. :meth:`HangonTransport.saver` writes them back after every
  answer, and names the turn it answered (``context.agent_turn``): a turn that arrived
  while no link was up is handed to the pipeline once, after ``on_session_ready``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, cast

from pipecat.audio.dtmf.types import KeypadEntry
from pipecat.audio.utils import create_stream_resampler, pcm_to_ulaw, ulaw_to_pcm
from pipecat.frames.frames import (
    BotStoppedSpeakingFrame,
    CancelFrame,
    CancelWorkerFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    InputTransportMessageFrame,
    InterruptionFrame,
    LLMContextAssistantTurnFrame,
    LLMContextUserTurnFrame,
    OutputAudioRawFrame,
    OutputTransportMessageFrame,
    OutputTransportMessageUrgentFrame,
    StartFrame,
    TranscriptionFrame,
)
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext, LLMContextMessage
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import BaseTransport, TransportParams
from pipecat.workers.runner import WorkerRunner
from websockets.asyncio.server import Server
from websockets.exceptions import ConnectionClosed

from gateway import agent
from gateway.agent import Call, End, Event, Mark, Media, Resume, Start, Turn

__all__ = ["HangonParams", "HangonTransport", "serve"]

log = logging.getLogger("gateway.pipecat")

PHONE_RATE = 8000
"""Twilio's audio: μ-law, 8 kHz, mono."""
_RTVI = "rtvi-ai"
"""The label of Pipecat's client-protocol messages, which are not for hangon."""


class HangonParams(TransportParams):
    """Audio in and out on, at the phone's rate; ``max_messages`` bounds what is saved."""

    audio_in_enabled: bool = True
    audio_out_enabled: bool = True
    audio_in_sample_rate: int | None = PHONE_RATE
    audio_out_sample_rate: int | None = PHONE_RATE
    max_messages: int = 200
    """LLM messages kept in the session state (the first, a system prompt, always is): the
    state must fit hangon's ``--max-state-size``."""


class HangonTransport(BaseTransport):
    """One session link from hangon, as a Pipecat transport.

    Events (``@transport.event_handler(name)``):

    - ``on_session_ready(transport, missed)``: the session started or resumed
      (:attr:`resumed`, :attr:`reason`); ``missed`` is a turn the caller made while no link
      was up, which the input hands to the pipeline right after this event (so do not
      greet or re-ask then). Also on a resume while the link is up (the caller came back
      to this gateway).
    - ``on_mark(transport, name)``: the phone played the audio up to a mark of the bot's.
    - ``on_session_ended(transport, over)``: the link is closing; ``over``: the caller
      hung up (said bye), otherwise they are away and the session may resume on another
      link. :meth:`run` then cancels the pipeline.
    """

    def __init__(self, call: Call, first: Start | Resume, params: HangonParams | None = None):
        super().__init__()
        self.call = call
        self.params = params or HangonParams()
        self.first = first
        self.last_turn: str | None = None
        """The last turn handed to the pipeline (what the next answer answers)."""
        self._input = HangonInput(self, name=self._input_name)
        self._output = HangonOutput(self, name=self._output_name)
        for name in ("on_session_ready", "on_mark", "on_session_ended"):
            # In order with the frames: a missed turn follows its on_session_ready.
            self._register_event_handler(name, sync=True)

    @property
    def resumed(self) -> bool:
        """Whether the session existed before this link (a resume or a redial)."""
        return isinstance(self.first, Resume)

    @property
    def reason(self) -> str | None:
        """``client_resumed`` or ``agent_reconnected`` on a resume; None on a start."""
        return self.first.reason if isinstance(self.first, Resume) else None

    @property
    def messages(self) -> list[LLMContextMessage] | None:
        """The LLM messages the session's state holds, or None (a new conversation)."""
        saved = self.call.context.get("pipecat")
        messages = saved.get("messages") if isinstance(saved, dict) else None
        if not isinstance(messages, list) or not messages:
            return None
        return [
            cast(LLMContextMessage, m)
            for m in messages
            if isinstance(m, dict) and isinstance(m.get("role"), str)
        ]

    def input(self) -> HangonInput:
        return self._input

    def output(self) -> HangonOutput:
        return self._output

    def saver(self, context: LLMContext) -> ContextSaver:
        """The processor that writes ``context`` to the session after each answer: put it
        last, after the assistant context aggregator."""
        return ContextSaver(self, context)

    def pipeline_params(self, **overrides: Any) -> PipelineParams:
        """Pipeline parameters at the phone's audio rates."""
        rates = {
            "audio_in_sample_rate": self.params.audio_in_sample_rate,
            "audio_out_sample_rate": self.params.audio_out_sample_rate,
        }
        return PipelineParams(**{**rates, **overrides})

    async def run(self, worker: PipelineWorker) -> None:
        """Run the pipeline until the link closes (cancelled then: the session goes on
        elsewhere, or is over)."""
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        await runner.run()


class HangonInput(BaseInputTransport):
    """hangon's events into the pipeline."""

    def __init__(self, transport: HangonTransport, **kwargs: Any) -> None:
        super().__init__(transport.params, **kwargs)
        self._transport = transport
        self._resampler = create_stream_resampler()
        self._receiving: asyncio.Task[None] | None = None

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._receiving is None:
            self._receiving = self.create_task(self._receive())

    async def stop(self, frame: EndFrame) -> None:
        await super().stop(frame)
        await self._stop_receiving()

    async def cancel(self, frame: CancelFrame) -> None:
        await super().cancel(frame)
        await self._stop_receiving()

    async def _stop_receiving(self) -> None:
        if self._receiving is not None:
            await self.cancel_task(self._receiving)
            self._receiving = None

    async def _receive(self) -> None:
        transport = self._transport
        await self._event(transport.first)
        while True:
            event = await transport.call.receive()
            await self._event(event)
            if isinstance(event, End):
                await transport._call_event_handler("on_session_ended", event.over)
                await self.push_frame(CancelWorkerFrame(), FrameDirection.UPSTREAM)
                return

    async def _event(self, event: Event) -> None:
        transport = self._transport
        if isinstance(event, Media):
            pcm = await ulaw_to_pcm(event.audio, PHONE_RATE, self.sample_rate, self._resampler)
            if pcm:
                audio = InputAudioRawFrame(audio=pcm, sample_rate=self.sample_rate, num_channels=1)
                await self.push_audio_frame(audio)
        elif isinstance(event, Turn):
            transport.last_turn = event.turn_id
            for frame in _turn_frames(event, transport.call.caller):
                await self.push_frame(frame)
        elif isinstance(event, (Start, Resume)):
            how = f"resumed ({event.reason})" if isinstance(event, Resume) else "started"
            log.info("session=%s %s", transport.call.session_id, how)
            await transport._call_event_handler("on_session_ready", event.missed)
        elif isinstance(event, Mark):
            await transport._call_event_handler("on_mark", event.name)


def _turn_frames(turn: Turn, caller: dict[str, str]) -> list[Frame]:
    """A turn as Pipecat frames: its keys, its text, or (a form) a transport message."""
    frames: list[Frame] = []
    for digit in turn.dtmf or "":
        with contextlib.suppress(ValueError):
            frames.append(InputDTMFFrame(KeypadEntry(digit)))
    if turn.text:
        who = caller.get("user_id") or caller.get("phone") or ""
        now = datetime.now(UTC).isoformat()
        frames.append(TranscriptionFrame(turn.text, who, now, finalized=True))
    if turn.form or turn.context:
        message = {"type": "turn", "turn_id": turn.turn_id, "form": turn.form}
        frames.append(InputTransportMessageFrame(message={**message, "context": turn.context}))
    return frames


class HangonOutput(BaseOutputTransport):
    """The pipeline's audio, clears and messages out to hangon."""

    def __init__(self, transport: HangonTransport, **kwargs: Any) -> None:
        super().__init__(transport.params, **kwargs)
        self._transport = transport
        self._resampler = create_stream_resampler()
        self._interval = 0.0
        self._next_send = 0.0
        self._utterances = 0

    async def start(self, frame: StartFrame) -> None:
        await super().start(frame)
        # Pace audio as a phone plays it, so that an interruption finds little queued.
        self._interval = (self.audio_chunk_size / self.sample_rate) / 2
        await self.set_transport_ready(frame)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InterruptionFrame) and self._transport.call.phone:
            await self._send(self._transport.call.clear())
            self._next_send = 0.0

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        # The bot's audio of an utterance is all sent: a mark says when the phone has
        # played it (the on_mark event, with the mark's name).
        call = self._transport.call
        if isinstance(frame, BotStoppedSpeakingFrame) and direction is FrameDirection.DOWNSTREAM:
            if call.phone:
                self._utterances += 1
                await self._send(call.mark(f"utterance-{self._utterances}"))
        await super().push_frame(frame, direction)

    async def send_message(
        self, frame: OutputTransportMessageFrame | OutputTransportMessageUrgentFrame
    ) -> None:
        message = frame.message
        if isinstance(message, dict) and message.get("label") != _RTVI:
            await self._send(self._transport.call.send(message))

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        call = self._transport.call
        if not call.phone:
            return False  # audio goes to phone streams only; text clients get the words
        ulaw = await pcm_to_ulaw(frame.audio, frame.sample_rate, PHONE_RATE, self._resampler)
        if not ulaw or not await self._send(call.media(ulaw)):
            return False
        now = time.monotonic()
        wait = max(0.0, self._next_send - now)
        await asyncio.sleep(wait)
        self._next_send = (now if wait == 0 else self._next_send) + self._interval
        return True

    async def _send(self, sending: Awaitable[None]) -> bool:
        try:
            await sending
        except (ConnectionClosed, TimeoutError):
            return False  # the link is gone or stuck; the input side ends the pipeline
        return True


class ContextSaver(FrameProcessor):
    """Writes the LLM messages to the session state after each answer of the bot's, naming
    the turn it answered, so that the next link starts from them."""

    def __init__(self, transport: HangonTransport, context: LLMContext) -> None:
        super().__init__()
        self._transport = transport
        self._context = context
        self._answering: str | None = None

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, LLMContextUserTurnFrame):
            self._answering = self._transport.last_turn
        elif isinstance(frame, LLMContextAssistantTurnFrame):
            await self.save()
        await self.push_frame(frame, direction)

    async def save(self) -> None:
        """Write the messages now (also answering the turn the last user message came from)."""
        transport = self._transport
        keep = transport.params.max_messages
        messages = [m for m in self._context.get_messages() if _plain(m)]
        if len(messages) > keep:
            messages = messages[:1] + messages[len(messages) - keep + 1 :]
        answered, self._answering = self._answering, None
        with contextlib.suppress(ConnectionClosed, TimeoutError):
            await transport.call.patch(
                context={"pipecat": {"messages": messages}}, answered=answered
            )


def _plain(message: Any) -> bool:
    """A message that is JSON (Pipecat may hold LLM-specific objects, images)."""
    if not isinstance(message, dict):
        return False
    try:
        json.dumps(message)
    except (TypeError, ValueError):
        return False
    return True


async def serve(
    bot: Callable[[HangonTransport], Awaitable[None]],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    params: HangonParams | None = None,
    send_timeout: float = 20.0,
) -> Server:
    """Serve ``bot(transport)`` for every link hangon opens; close the server to stop.

    ``bot`` is an async function that builds its pipeline on the :class:`HangonTransport`
    and runs it (``await transport.run(worker)``) until the link closes.
    """

    async def link(call: Call) -> None:
        first = await call.receive()
        if not isinstance(first, (Start, Resume)):
            return  # hangon always opens with session.start or session.resume
        await bot(HangonTransport(call, first, params))

    return await agent.serve(link, host, port, send_timeout=send_timeout)
