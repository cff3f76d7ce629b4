"""A phone call through a gateway process that is SIGKILLed mid-call: the app re-attaches the
call to another gateway and nothing the caller pressed, and the agent heard, is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from loadtest.twilio import CHUNK, TwilioCall
from tests.support.agents import TestAgent, phone
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer
from tests.support.wsclient import url

pytestmark = pytest.mark.slow


@pytest.fixture
def gateways(tmp_path: Path) -> Iterator[list[GatewayProcess]]:
    made: list[GatewayProcess] = []
    yield made
    for gw in made:
        if gw.proc is not None and gw.proc.poll() is None:
            gw.kill()


async def test_call_moves_to_another_gateway_after_a_kill(
    own_redis: RedisServer, tmp_path: Path, gateways: list[GatewayProcess], speech: bytes
) -> None:
    """Every key press the agent heard before the kill is in the state the second gateway
    restores; the call's audio then flows through the second gateway to the new stream."""
    half = len(speech) // 2 // CHUNK * CHUNK
    async with TestAgent(phone) as voice:
        for name in ("first", "second"):
            gw = GatewayProcess(
                tmp_path / f"{name}.log", "--redis-url", own_redis.url, "--downstream", voice.url
            )
            gw.start()
            gateways.append(gw)
        first_gw, second_gw = gateways
        call = TwilioCall(url(first_gw.port, "/v1/twilio"))
        first = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        await first.play(speech[:half])
        for digit in "123":
            await first.dtmf(digit)
        await voice.wait_for(lambda r: len(voice.of_type("turn")) == 3)
        heard = voice.of_type("turn")

        first_gw.kill()
        assert await first.closed() == 1006  # no close frame from a dead process

        call.url = url(second_gw.port, "/v1/twilio")
        second = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.resume")) == 1)
        resume = voice.of_type("session.resume")[0]
        assert resume["session_id"] == voice.of_type("session.start")[0]["session_id"]
        assert resume["stream"]["stream_sid"] == second.stream_sid
        assert resume["state"]["last_turn"]["turn_id"] == heard[-1]["turn_id"]
        assert resume["state"]["last_turn"]["dtmf"] == "3"
        assert resume["version"] >= heard[-1]["version"]

        await second.play(speech[half:])
        rest = -(-(len(speech) - half) // CHUNK)
        await second.wait_for(lambda r: sum(f["event"] == "media" for f in r) == rest)
        assert second.audio() == speech[half:]
        await second.stop()
