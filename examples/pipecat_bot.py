"""A Pipecat bot behind hangon that books a table, and needs no outside service.

Rule-based processors stand in for the services a real bot would call: the caller's key
presses are its speech-to-text, a small state machine over the LLM messages is its LLM,
and espeak-ng is its text-to-speech (real speech, 8 kHz to the phone). It also echoes the
caller's audio back, so that a call shows audio flowing both ways.

Run it, then point hangon at it::

    pip install 'hangon[pipecat]'          # and espeak-ng: apt-get install espeak-ng
    python examples/pipecat_bot.py --port 8766
    hangon serve --downstream ws://127.0.0.1:8766/

and call it as Twilio would, with a drop half way: ``python examples/pipecat_call.py``.

What makes it survive a drop is the part marked "hangon": the transport, the saver, and
asking again where the call stood. The rest is an ordinary Pipecat bot.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import logging
import subprocess
import sys
import wave
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from loguru import logger
from pipecat.frames.frames import (
    Frame,
    InputAudioRawFrame,
    InputDTMFFrame,
    LLMContextFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMRunFrame,
    LLMTextFrame,
    OutputAudioRawFrame,
    TranscriptionFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext, LLMContextMessage
from pipecat.processors.aggregators.llm_response_universal import LLMContextAggregatorPair
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
from pipecat.services.settings import TTSSettings
from pipecat.services.tts_service import TTSService

from gateway.pipecat import HangonTransport, serve

log = logging.getLogger("pipecat_bot")

SYSTEM: LLMContextMessage = {
    "role": "system",
    "content": "You book tables at Chez Ada. Ask one thing at a time.",
}
DAYS = {"1": "Monday", "2": "Tuesday", "3": "Wednesday"}
DIGITS = set("123456789")
GREETING = "Hello! I can book you a table."
QUESTIONS = [
    ("day", "Which day? Press 1 for Monday, 2 for Tuesday, 3 for Wednesday."),
    ("guests", "For how many people? Press a number from 1 to 9."),
    ("confirm", "Press 1 to confirm, or 2 to start again."),
]


class KeypadSTT(FrameProcessor):
    """Speech-to-text, for this example: each key the caller presses is what they said."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputDTMFFrame):
            await self.push_frame(
                TranscriptionFrame(frame.button.value, "caller", "", finalized=True)
            )
        else:
            await self.push_frame(frame, direction)


class BookingLLM(FrameProcessor):
    """The LLM, for this example: reads the conversation and says the next line."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if not isinstance(frame, LLMContextFrame):
            await self.push_frame(frame, direction)
            return
        line = reply(frame.context.get_messages())
        log.info("bot says: %s", line)
        await self.push_frame(LLMFullResponseStartFrame())
        await self.push_frame(LLMTextFrame(line))
        await self.push_frame(LLMFullResponseEndFrame())


def reply(messages: list[Any]) -> str:
    """The bot's next line, from the conversation so far (all it knows is in it)."""
    said = [m for m in messages if isinstance(m, dict) and m.get("role") in ("user", "assistant")]
    if not said:
        return f"{GREETING} {QUESTIONS[0][1]}"
    answers: dict[str, str] = {}
    understood = True
    for m in said:
        if m["role"] != "user" or len(answers) == len(QUESTIONS):
            continue
        name, key = QUESTIONS[len(answers)][0], str(m["content"]).strip()
        understood = True
        if name == "day" and key in DAYS:
            answers[name] = DAYS[key]
        elif name == "guests" and key in DIGITS:
            answers[name] = key
        elif name == "confirm" and key == "1":
            answers[name] = key
        elif name == "confirm" and key == "2":
            answers.clear()
        else:
            understood = False
    if len(answers) == len(QUESTIONS):
        return f"Booked: {answers['guests']} on {answers['day']}. Goodbye!"
    question = QUESTIONS[len(answers)][1]
    if said[-1]["role"] == "assistant":  # asked to speak with nothing new: a resume
        return f"Welcome back. {question}"
    return question if understood else f"Sorry, I did not get that. {question}"


class Echo(FrameProcessor):
    """Plays the caller's audio back to them, as hangon's demo agent does."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            echo = OutputAudioRawFrame(frame.audio, frame.sample_rate, frame.num_channels)
            await self.push_frame(echo)
        await self.push_frame(frame, direction)


class EspeakTTS(TTSService):
    """Text-to-speech with espeak-ng (22,050 Hz, resampled to the pipeline's rate)."""

    def __init__(self, **kwargs: Any) -> None:
        settings = TTSSettings(model="espeak-ng", voice="en", language=None)
        super().__init__(push_start_frame=True, push_stop_frames=True, settings=settings, **kwargs)

    def can_generate_metrics(self) -> bool:
        return False

    async def run_tts(self, text: str, context_id: str) -> AsyncGenerator[Frame, None]:
        done = await asyncio.to_thread(
            subprocess.run, ["espeak-ng", "--stdout", text], capture_output=True, check=True
        )
        with wave.open(io.BytesIO(done.stdout)) as wav:
            rate, pcm = wav.getframerate(), wav.readframes(wav.getnframes())

        async def chunks() -> AsyncIterator[bytes]:
            for at in range(0, len(pcm), 4410):  # 100 ms
                yield pcm[at : at + 4410]

        async for frame in self._stream_audio_frames_from_iterator(
            chunks(), in_sample_rate=rate, context_id=context_id
        ):
            yield frame


async def bot(transport: HangonTransport) -> None:
    context = LLMContext(transport.messages or [SYSTEM])  # hangon: the conversation so far
    user, assistant = LLMContextAggregatorPair(context)
    pipeline = Pipeline(
        [
            transport.input(),
            Echo(),
            KeypadSTT(),
            user,
            BookingLLM(),
            EspeakTTS(),
            transport.output(),
            assistant,
            transport.saver(context),  # hangon: the conversation, saved after each answer
        ]
    )
    worker = PipelineWorker(pipeline, params=transport.pipeline_params())

    async def ready(transport: HangonTransport, missed: Any) -> None:
        if missed is None:  # hangon: greet, or ask again where the call stood
            await worker.queue_frames([LLMRunFrame()])

    transport.add_event_handler("on_session_ready", ready)

    await transport.run(worker)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logger.remove()  # Pipecat logs every frame at DEBUG
    logger.add(sys.stderr, level="INFO")
    server = await serve(bot, args.host, args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"pipecat bot listening port={port}", flush=True)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
