"""Replay a phone call to the gateway as Twilio Media Streams would, drop it, and re-attach.

Speaks Twilio's bidirectional stream protocol from Twilio's side: ``connected``,
``start`` (with the caller in a custom parameter), ``media`` in 20 ms chunks of
base64 μ-law at 8 kHz, ``dtmf`` and ``stop``, and echoes every ``mark`` the
gateway sends, as Twilio does once the audio before it has played (here: at
once). A re-attached call is a new stream (new ``streamSid``) for the same
``callSid``, as when the app answers ``<Connect action>`` with the same TwiML.

As a tool, against a gateway running the demo agent (which echoes a caller's
audio)::

    python -m loadtest.twilio --url ws://127.0.0.1:8765/v1/twilio --say "My name is Ada"

It plays the audio, presses ``--digits``, drops the connection half way
through (no close frame), re-attaches with a new stream and plays the rest,
then prints a JSON report: per stream, what was sent, what came back and
whether every frame back carried that stream's ``streamSid``. Exit code 1 if
the echoed audio differs from what was sent, or a frame carried a stale
``streamSid``. Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import re
import secrets
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from gateway.core.twilio import signature
from loadtest.net import check_loopback

__all__ = ["CHUNK", "Stream", "TwilioCall", "speech"]

CHUNK = 160
"""Bytes of μ-law per media message: 20 ms at 8 kHz, as Twilio sends them."""


def speech(text: str, directory: Path) -> bytes:
    """Say ``text`` with espeak-ng and return it as raw μ-law, 8 kHz mono (sox converts)."""
    wav, ulaw = directory / "speech.wav", directory / "speech.ulaw"
    subprocess.run(["espeak-ng", "-w", str(wav), text], check=True, capture_output=True)
    subprocess.run(
        ["sox", str(wav), "-r", "8000", "-c", "1", "-e", "mu-law", "-t", "raw", str(ulaw)],
        check=True,
        capture_output=True,
    )
    return ulaw.read_bytes()


class Stream:
    """One ``<Connect><Stream>`` WebSocket of a call, from Twilio's side."""

    def __init__(self, ws: ClientConnection, stream_sid: str) -> None:
        self.ws = ws
        self.stream_sid = stream_sid
        self.received: list[dict[str, Any]] = []
        """Every frame the gateway sent, in order."""
        self.sent_audio = bytearray()
        self._seq = 0
        self._chunk = 0
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @property
    def close_code(self) -> int | None:
        """The close code the gateway sent, once closed."""
        return self.ws.close_code

    def audio(self) -> bytes:
        """The audio the gateway sent back, in order."""
        return b"".join(
            base64.b64decode(f["media"]["payload"]) for f in self.received if f["event"] == "media"
        )

    async def send(self, event: str, body: dict[str, Any] | None = None) -> None:
        """Send one Twilio message, numbered as Twilio numbers them."""
        self._seq += 1
        message: dict[str, Any] = {
            "event": event,
            "sequenceNumber": str(self._seq),
            "streamSid": self.stream_sid,
        }
        if body is not None:
            message[event] = body
        await self.ws.send(json.dumps(message))

    async def media(self, chunk: bytes) -> None:
        """Send one chunk of the caller's audio."""
        self._chunk += 1
        await self.send(
            "media",
            {
                "track": "inbound",
                "chunk": str(self._chunk),
                "timestamp": str((self._chunk - 1) * 20),
                "payload": base64.b64encode(chunk).decode(),
            },
        )
        self.sent_audio += chunk

    async def play(self, audio: bytes, *, pace: float = 0.0) -> None:
        """Send ``audio`` in 20 ms chunks, ``pace`` seconds apart (0: as fast as it goes)."""
        for at in range(0, len(audio), CHUNK):
            await self.media(audio[at : at + CHUNK])
            if pace:
                await asyncio.sleep(pace)

    async def dtmf(self, digit: str) -> None:
        """Press a key."""
        await self.send("dtmf", {"track": "inbound_track", "digit": digit})

    async def stop(self) -> None:
        """End the stream as Twilio does: ``stop``, then wait for the close."""
        await self.send("stop", {"accountSid": "", "callSid": ""})
        await self.closed()

    def abort(self) -> None:
        """Drop the TCP connection with no close frame, as a network failure does."""
        self.ws.transport.abort()
        self._reader.cancel()

    async def closed(self, timeout: float = 10) -> int | None:
        """Wait for the connection to close; return the gateway's close code."""
        async with asyncio.timeout(timeout):
            await self.ws.wait_closed()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader
        return self.close_code

    async def wait_for(
        self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 10
    ) -> None:
        """Wait until ``predicate(received)`` holds."""
        async with asyncio.timeout(timeout):
            while not predicate(self.received):
                self._changed.clear()
                await self._changed.wait()

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in self.ws:
                frame = json.loads(raw)
                self.received.append(frame)
                self._changed.set()
                if frame.get("event") == "mark":
                    # Twilio answers a mark once the audio queued before it has played.
                    await self.send("mark", {"name": frame["mark"]["name"]})


class TwilioCall:
    """One phone call; each :meth:`stream` is a new ``<Connect><Stream>`` for it.

    Args:
        url: The gateway's Twilio endpoint (``ws://127.0.0.1:8765/v1/twilio``).
        caller: The ``From`` custom parameter.
        params: More custom parameters (``tenant``); ``caller_param`` names the caller's.
        auth_token: Sign the upgrade with ``X-Twilio-Signature`` under this token.
        signed_url: The URL to sign (what the TwiML said); by default ``url`` with
            ``wss://``, which is what the gateway assumes Twilio used (TLS ends at a proxy).
    """

    def __init__(
        self,
        url: str,
        *,
        caller: str = "+14155550100",
        params: dict[str, str] | None = None,
        caller_param: str = "From",
        auth_token: str | None = None,
        signed_url: str | None = None,
    ) -> None:
        self.url = url
        self.call_sid = "CA" + secrets.token_hex(16)
        self.account_sid = "AC" + secrets.token_hex(16)
        self.params = {caller_param: caller, **(params or {})}
        self.auth_token = auth_token
        self.signed_url = signed_url or re.sub(r"^ws://", "wss://", url)
        self.streams: list[Stream] = []

    async def stream(self) -> Stream:
        """Open a new stream for this call and send ``connected`` and ``start``."""
        headers = {}
        if self.auth_token is not None:
            headers["X-Twilio-Signature"] = signature(self.auth_token, self.signed_url)
        ws = await connect(self.url, additional_headers=headers, open_timeout=10)
        stream = Stream(ws, "MZ" + secrets.token_hex(16))
        await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await stream.send(
            "start",
            {
                "accountSid": self.account_sid,
                "streamSid": stream.stream_sid,
                "callSid": self.call_sid,
                "tracks": ["inbound"],
                "customParameters": self.params,
                "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            },
        )
        self.streams.append(stream)
        return stream


async def replay(
    url: str,
    audio: bytes,
    *,
    digits: str,
    pace: float,
    auth_token: str | None,
    signed_url: str | None,
    echo_wait: float,
) -> dict[str, Any]:
    """Play ``audio`` with a drop half way and a re-attach; report what came back."""
    call = TwilioCall(url, auth_token=auth_token, signed_url=signed_url)
    half = len(audio) // 2 // CHUNK * CHUNK
    report: dict[str, Any] = {"call_sid": call.call_sid, "streams": []}
    started = time.monotonic()
    for part, piece in enumerate((audio[:half], audio[half:])):
        stream = await call.stream()
        await stream.play(piece, pace=pace)
        for digit in digits if part == 0 else "":
            await stream.dtmf(digit)
        # Let the echo of the last chunk come back before the stream ends.
        chunks = -(-len(piece) // CHUNK)

        def echoed(received: list[dict[str, Any]], n: int = chunks) -> bool:
            return sum(1 for f in received if f["event"] == "media") >= n

        with contextlib.suppress(TimeoutError):
            await stream.wait_for(echoed, echo_wait)
        if part == 0:
            stream.abort()
            code: int | None = None
        else:
            await stream.stop()
            code = stream.close_code
        back = stream.audio()
        report["streams"].append(
            {
                "stream_sid": stream.stream_sid,
                "audio_bytes_sent": len(stream.sent_audio),
                "audio_bytes_back": len(back),
                "echo_identical": back == bytes(stream.sent_audio),
                "frames_back": {
                    kind: sum(f["event"] == kind for f in stream.received)
                    for kind in ("media", "mark", "clear")
                },
                "stale_stream_sid": sum(
                    f.get("streamSid") != stream.stream_sid for f in stream.received
                ),
                "ended": "dropped (no close frame)" if part == 0 else f"stop, close {code}",
            }
        )
    report["seconds"] = round(time.monotonic() - started, 3)
    report["ok"] = all(s["echo_identical"] and not s["stale_stream_sid"] for s in report["streams"])
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.twilio", description=__doc__)
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/twilio")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--say", default="My name is Ada Lovelace and I would like a checkup.")
    source.add_argument("--audio", type=Path, help="raw μ-law, 8 kHz mono (sox … -e mu-law -t raw)")
    parser.add_argument("--digits", default="42", help="keys pressed before the drop")
    parser.add_argument("--pace", type=float, default=0.02, help="seconds between chunks")
    parser.add_argument("--auth-token", help="sign the upgrade (X-Twilio-Signature)")
    parser.add_argument(
        "--signed-url",
        help="the URL to sign, as the gateway's --twilio-url; default: --url, wss://",
    )
    parser.add_argument("--echo-wait", type=float, default=5.0, help="seconds to await the echo")
    args = parser.parse_args(argv)
    check_loopback(args.url)
    if args.audio is not None:
        audio = args.audio.read_bytes()
    else:
        with tempfile.TemporaryDirectory() as tmp:
            audio = speech(args.say, Path(tmp))
    try:
        report = asyncio.run(
            replay(
                args.url,
                audio,
                digits=args.digits,
                pace=args.pace,
                auth_token=args.auth_token,
                signed_url=args.signed_url,
                echo_wait=args.echo_wait,
            )
        )
    except InvalidStatus as exc:
        print(f"the gateway refused the stream: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
