"""A real Pipecat bot (examples/pipecat_bot.py) behind two gateway processes and real Redis.

A Twilio-format call reaches the bot's pipeline through the first gateway; the stream then
drops (or the gateway is SIGKILLed) mid-call and the call re-attaches through the second.
The bot goes on from its restored context: no second greeting, the next question, the
echo of the caller's audio on the new stream; every key the caller pressed is in the
conversation once, and answered once.
"""

from __future__ import annotations

import asyncio
import base64
import importlib.util
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from loadtest.twilio import CHUNK, Stream, TwilioCall
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.stores import stored
from tests.support.wsclient import url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CALLER = "+14155550100"
DAY = "Which day? Press 1 for Monday, 2 for Tuesday, 3 for Wednesday."
GUESTS = "For how many people? Press a number from 1 to 9."
CONFIRM = "Press 1 to confirm, or 2 to start again."


@pytest.fixture
def bot(tmp_path: Path, speech: bytes) -> Iterator[int]:
    """examples/pipecat_bot.py in a process of its own; its port. (``speech`` makes sure
    espeak-ng, its voice, is here.)"""
    if importlib.util.find_spec("pipecat") is None:
        if os.environ.get("HANGON_REQUIRE_PIPECAT"):
            pytest.fail("pipecat-ai is not installed (HANGON_REQUIRE_PIPECAT is set)")
        pytest.skip("pipecat-ai not installed: pip install -e '.[pipecat]'")
    log = tmp_path / "bot.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "examples/pipecat_bot.py"), "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60  # importing Pipecat takes seconds
        while not (found := re.search(rb"listening port=(\d+)", log.read_bytes())):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield int(found.group(1))
        errors = [line for line in log.read_text().splitlines() if " ERROR " in line]
        assert not errors, errors
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.fixture
def gateways(tmp_path: Path, own_redis: RedisServer, bot: int) -> Iterator[list[GatewayProcess]]:
    made = []
    for name in ("first", "second"):
        gw = GatewayProcess(
            tmp_path / f"{name}.log",
            *("--redis-url", own_redis.url, "--downstream", f"ws://127.0.0.1:{bot}/"),
        )
        gw.start()
        made.append(gw)
    yield made
    for gw in made:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()


async def spoken(stream: Stream, marks: int, timeout: float = 20) -> int:
    """Wait until the phone has played ``marks`` utterances of the bot's; the index in
    ``stream.received`` after the last one."""
    await stream.wait_for(lambda r: sum(f["event"] == "mark" for f in r) >= marks, timeout)
    return max(i for i, f in enumerate(stream.received) if f["event"] == "mark") + 1


async def echoed(stream: Stream, audio: bytes, since: int) -> None:
    """Play ``audio`` and wait until the bot has played it back, byte for byte (but the
    last 40 ms, which Pipecat's output holds until it has a whole chunk to send)."""
    await stream.play(audio, pace=0.02)
    expected = audio[: len(audio) - 2 * CHUNK]

    def back(received: list[dict[str, Any]]) -> bool:
        media = [f for f in received[since:] if f["event"] == "media"]
        return expected in b"".join(base64.b64decode(f["media"]["payload"]) for f in media)

    await stream.wait_for(back, 10)


async def saved(redis: RedisServer, call: TwilioCall, until: Callable[[Any], bool]) -> Any:
    """The call's session state as stored, once ``until(state)`` holds."""
    caller = {"phone": CALLER, "call_id": call.call_sid}
    async with asyncio.timeout(10):
        while True:
            held = await stored(redis.url, caller)
            if b"state" in held and until(state := json.loads(held[b"state"])):
                return state
            await asyncio.sleep(0.02)


def last_key(state: Any) -> str | None:
    return (state.get("last_turn") or {}).get("dtmf")


def answered(state: Any) -> bool:
    """The bot's answer to the last turn is saved (it names the turn)."""
    last = (state.get("last_turn") or {}).get("turn_id")
    return last is not None and (state.get("context") or {}).get("agent_turn") == last


@pytest.mark.parametrize("fault", ["drop", "sigkill", "sigkill-before-the-answer"])
async def test_call_goes_on_through_another_gateway(
    fault: str, own_redis: RedisServer, gateways: list[GatewayProcess], speech: bytes
) -> None:
    first_gw, second_gw = gateways
    half = len(speech) // 2 // CHUNK * CHUNK
    call = TwilioCall(url(first_gw.port, "/v1/twilio"), caller=CALLER)
    first = await call.stream()
    greeted = await spoken(first, 1)  # the greeting and the first question, played
    await echoed(first, speech[:half], greeted)
    await first.dtmf("2")  # Tuesday
    if fault == "sigkill-before-the-answer":
        # The key is stored; the bot's answer is saved only once it has been played.
        state = await saved(own_redis, call, lambda s: last_key(s) == "2")
        assert not answered(state)
    else:
        await spoken(first, 2)  # the second question, played
        await saved(own_redis, call, answered)
    if fault == "drop":
        first.abort()  # no close frame: a network failure
    else:
        first_gw.kill()
        assert await first.closed() == 1006

    call.url = url(second_gw.port, "/v1/twilio")
    second = await call.stream()
    resumed = await spoken(second, 1)  # the second question (again, or for the first time)
    await echoed(second, speech[half:], resumed)
    await second.dtmf("4")
    await spoken(second, 2)
    await second.dtmf("1")
    await spoken(second, 3)
    state = await saved(own_redis, call, lambda s: answered(s) and last_key(s) == "1")
    await second.stop()
    assert all(f["streamSid"] == second.stream_sid for f in second.received)

    said = [(m["role"], m["content"]) for m in state["context"]["pipecat"]["messages"]]
    # Each key once, each answered once; a resume after the answer asks the next question
    # (not the greeting), a resume before it answers the key it missed.
    back = (
        [] if fault == "sigkill-before-the-answer" else [("assistant", f"Welcome back. {GUESTS}")]
    )
    assert said[1:] == [
        ("assistant", f"Hello! I can book you a table. {DAY}"),
        ("user", "2"),
        ("assistant", GUESTS),
        *back,
        ("user", "4"),
        ("assistant", CONFIRM),
        ("user", "1"),
        ("assistant", "Booked: 4 on Tuesday. Goodbye!"),
    ]
