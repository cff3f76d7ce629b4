"""Call the example Pipecat bot as Twilio would, drop the call half way, and come back.

With the bot and a gateway running (docs/agents.md, "Pipecat")::

    python examples/pipecat_call.py --url ws://127.0.0.1:8765/v1/twilio --save call.wav

It waits for the greeting to play, speaks (espeak-ng) and presses 2 (Tuesday), waits for
the next question, then drops the stream with no close frame and opens a new one for the
same call (``--reattach-url``: through another gateway), where the bot says "Welcome
back" and asks that question again instead of greeting. It presses 4 and 1 and hangs up.
It prints what came back on each stream; ``--save`` writes all the bot's audio to a WAV
file to listen to. The bot's own log says each line it spoke.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # loadtest/, from a checkout

from loadtest.twilio import CHUNK, Stream, TwilioCall, speech


async def played(stream: Stream, marks: int) -> None:
    """Wait until the phone has played ``marks`` of the bot's utterances."""
    await stream.wait_for(lambda r: sum(f["event"] == "mark" for f in r) >= marks, 30)


def report(stream: Stream, said: bytes) -> dict[str, Any]:
    back = stream.audio()
    return {
        "stream_sid": stream.stream_sid,
        "utterances_played": sum(f["event"] == "mark" for f in stream.received),
        "audio_seconds_back": round(len(back) / 8000, 2),
        # The bot echoes the caller; all but the last 40 ms (Pipecat sends whole chunks).
        "echo_back": said[: len(said) - 2 * CHUNK] in back,
        "stale_stream_sid": sum(f["streamSid"] != stream.stream_sid for f in stream.received),
    }


async def call(url: str, reattach_url: str, voice: bytes) -> tuple[list[dict[str, Any]], bytes]:
    half = len(voice) // 2 // CHUNK * CHUNK
    phone = TwilioCall(url)
    first = await phone.stream()
    await played(first, 1)  # the greeting and the first question
    await first.play(voice[:half], pace=0.02)
    await first.dtmf("2")
    await played(first, 2)  # the second question
    first.abort()  # a network failure: no close frame
    phone.url = reattach_url
    second = await phone.stream()
    await played(second, 1)  # "Welcome back", and the second question again
    await second.play(voice[half:], pace=0.02)
    for n, key in enumerate("41", start=2):
        await second.dtmf(key)
        await played(second, n)
    await second.stop()
    streams = [report(first, voice[:half]), report(second, voice[half:])]
    return streams, first.audio() + second.audio()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/twilio")
    parser.add_argument("--reattach-url", help="the re-attached stream's gateway (default: --url)")
    parser.add_argument("--save", type=Path, help="write the bot's audio to this WAV file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        voice = speech("Hello, I would like to book a table.", Path(tmp))
        try:
            streams, audio = asyncio.run(call(args.url, args.reattach_url or args.url, voice))
        except TimeoutError:
            print("the bot played nothing for 30 s: is the gateway's --downstream the bot?")
            return 1
        if args.save is not None:
            raw = Path(tmp) / "call.ulaw"
            raw.write_bytes(audio)
            convert = ["sox", "-t", "raw", "-r", "8000", "-e", "mu-law", "-c", "1", str(raw)]
            subprocess.run([*convert, str(args.save)], check=True)
    ok = all(s["echo_back"] and not s["stale_stream_sid"] for s in streams)
    print(json.dumps({"streams": streams, "ok": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
