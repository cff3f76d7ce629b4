"""Twilio Media Streams through a real gateway: a replayed call with real speech reaches the
agent byte for byte, the agent's audio and marks reach the stream the call is on now, and a
call dropped mid-sentence resumes on a new stream with every key press it made."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from gateway.config import Config
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from gateway.transport.downstream import EARLY_MEDIA
from loadtest.twilio import CHUNK, Stream, TwilioCall
from tests.support.agents import TestAgent, phone
from tests.support.gateways import RelayFactory
from tests.support.gwmetrics import sample
from tests.support.redis_server import free_port
from tests.support.relayclient import Caller
from tests.support.stores import StoreFactory
from tests.support.storewrap import Wrapper
from tests.support.wsclient import url

pytestmark = pytest.mark.stores("redis")

TWILIO = "/v1/twilio"
TOKEN = "0123456789abcdef0123456789abcdef"


def audio_of(frames: list[dict[str, Any]]) -> bytes:
    return b"".join(base64.b64decode(f["payload"]) for f in frames)


def count(stream: Stream, event: str) -> int:
    return sum(f["event"] == event for f in stream.received)


async def stored_digits(gw: Gateway, digits: str) -> None:
    """Wait until the agent's patch with ``digits`` is written (the pump is asynchronous)."""
    async with asyncio.timeout(5):
        while True:
            lives = list(gw.sessions.live.values())
            if lives and lives[0].session is not None:
                if lives[0].session.state["form_answers"].get("digits") == digits:
                    return
            await asyncio.sleep(0.01)


async def test_a_call_dropped_mid_sentence_resumes_on_a_new_stream(
    relay: RelayFactory, speech: bytes
) -> None:
    """Speech reaches the agent byte for byte and in order, even while its link dials; the
    echo and marks come back with the stream's own streamSid; after a drop mid-call a new
    stream for the call resumes the session with both key presses, and the echo follows it."""
    # Within the link's early buffer, all of it played before the link is up.
    half = min(len(speech) // 2 // CHUNK, EARLY_MEDIA - 10) * CHUNK
    first_chunks = half // CHUNK
    async with relay(phone) as (gw, voice):
        call = TwilioCall(url(gw.port, TWILIO), params={"tenant": "acme"})
        first = await call.stream()
        await first.play(speech[:half])  # at once: the agent link is still dialling
        # A turn made before the link is up reaches the agent in session.start's state, not
        # as a turn frame (the downstream protocol): press the keys once it is up.
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        await first.dtmf("4")
        await first.dtmf("2")
        await voice.wait_for(lambda r: len(voice.of_type("media")) == first_chunks)
        start = voice.of_type("session.start")[0]
        assert voice.received[0] is start
        assert start["caller"] == {
            "tenant": "acme",
            "phone": "+14155550100",
            "call_id": call.call_sid,
        }
        assert start["stream"]["stream_sid"] == first.stream_sid
        assert start["stream"]["call_sid"] == call.call_sid
        assert start["stream"]["media_format"] == {
            "encoding": "audio/x-mulaw",
            "sampleRate": 8000,
            "channels": 1,
        }
        media = voice.of_type("media")
        assert audio_of(media) == speech[:half]
        assert [m["chunk"] for m in media] == list(range(1, first_chunks + 1))
        assert [m["timestamp"] for m in media[:3]] == [0, 20, 40]

        # Echo, then a mark per key press; Twilio echoes each mark back to the agent.
        await first.wait_for(
            lambda r: count(first, "media") == first_chunks and count(first, "mark") == 2
        )
        assert first.audio() == speech[:half]
        turns = voice.of_type("turn")
        assert [(t["dtmf"], t["version"]) for t in turns] == [("4", 1), ("2", 2)]
        assert turns[0]["turn_id"].startswith(f"dtmf-{first.stream_sid}-")
        await voice.wait_for(lambda r: len(voice.of_type("mark")) == 2)
        assert [m["name"] for m in voice.of_type("mark")] == [
            f"heard-{t['turn_id']}" for t in turns
        ]
        await stored_digits(gw, "42")

        first.abort()  # mid-call: no stop, no close frame
        second = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.resume")) == 1)
        resume = voice.of_type("session.resume")[0]
        assert resume["reason"] == "client_resumed"
        assert resume["session_id"] == start["session_id"]
        assert resume["stream"]["stream_sid"] == second.stream_sid != first.stream_sid
        assert resume["state"]["form_answers"] == {"digits": "42"}
        assert resume["state"]["last_turn"]["dtmf"] == "2"
        assert resume["version"] == 4  # two turns, two patches

        await second.play(speech[half:])
        await second.dtmf("7")
        rest = -(-(len(speech) - half) // CHUNK)
        await second.wait_for(
            lambda r: count(second, "media") == rest and count(second, "mark") == 1
        )
        assert second.audio() == speech[half:]
        assert audio_of(voice.of_type("media")) == speech
        await stored_digits(gw, "427")
        await second.stop()
        assert second.close_code == 1000
    assert not voice.of_type("session.end")  # a stream's stop does not end the call
    assert sample(gw, "hangon_session_turns_total", outcome="applied") == 3
    chunks = first_chunks + rest
    assert (
        sample(gw, "hangon_relay_media_frames_total", direction="to_agent", outcome="relayed")
        == chunks + 3
    )
    assert (
        sample(gw, "hangon_relay_media_frames_total", direction="to_caller", outcome="relayed")
        == chunks + 3
    )


async def pressed(gw: Gateway, voice: TestAgent, digit: str) -> tuple[TwilioCall, Stream]:
    """Start a call, and on its first stream press ``digit`` once the agent link is up;
    return the call and the stream once the agent has the turn."""
    call = TwilioCall(url(gw.port, TWILIO))
    first = await call.stream()
    await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
    await first.dtmf(digit)
    await voice.wait_for(lambda r: len(voice.of_type("turn")) == 1)
    return call, first


async def test_a_second_stream_for_an_open_call_takes_it_over(relay: RelayFactory) -> None:
    """A second stream for a call whose first is still open gets the session; the first is
    closed with 4500 and the agent's audio goes to the second only."""
    async with relay(phone) as (gw, voice):
        call, first = await pressed(gw, voice, "1")
        second = await call.stream()
        assert await first.closed() == 4500
        await voice.wait_for(lambda r: len(voice.of_type("session.resume")) == 1)
        await voice.send({"type": "media", "payload": "AAECAw=="})
        await second.wait_for(lambda r: count(second, "media") == 1)
        await voice.send({"type": "clear"})
        await second.wait_for(lambda r: count(second, "clear") == 1)
        assert [f["event"] for f in second.received] == ["media", "clear"]
    assert sample(gw, "hangon_session_takeovers_total", kind="local") == 1


async def test_stop_leaves_the_session_for_the_next_stream(relay: RelayFactory) -> None:
    """stop closes the stream with 1000; the next stream resumes the session (a re-attach)."""
    async with relay(phone) as (gw, voice):
        call, first = await pressed(gw, voice, "9")
        await first.stop()
        assert first.close_code == 1000
        await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.resume")) == 1)
        assert voice.of_type("session.resume")[0]["state"]["last_turn"]["dtmf"] == "9"
    assert sample(gw, "hangon_session_restores_total", outcome="hit") == 1


@pytest.mark.parametrize("public", [None, "wss://voice.example.com/v1/twilio"])
async def test_signature_checked_when_a_token_is_set(
    relay: RelayFactory, config: Config, public: str | None
) -> None:
    """With an auth token, a stream signed for the public URL opens and a missing or wrong
    X-Twilio-Signature is refused with 403 and counted."""
    twilio = config.replace("twilio", twilio_auth_token=("old", TOKEN), twilio_url=public)
    async with relay(phone, config=twilio) as (gw, voice):
        address = url(gw.port, TWILIO)
        signed = public or f"wss://127.0.0.1:{gw.port}{TWILIO}"
        good = TwilioCall(address, auth_token=TOKEN, signed_url=signed)
        await good.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        for call in (
            TwilioCall(address, auth_token="wrong", signed_url=signed),
            TwilioCall(address, auth_token=TOKEN, signed_url=signed + "x"),
            TwilioCall(address),  # unsigned
        ):
            with pytest.raises(InvalidStatus) as info:
                await call.stream()
            assert info.value.response.status_code == 403
        # The v1 endpoint is not Twilio's: no signature asked for.
        async with connect(url(gw.port)):
            pass
    assert sample(gw, "hangon_auth_failures_total", reason="twilio_signature") == 3
    assert len(voice.of_type("session.start")) == 1


@pytest.mark.parametrize(
    ("frames", "code", "error"),
    [
        ([b"\x00"], 1003, "unsupported_data"),
        (['{"event":"media","media":{}}'], 1008, "unexpected_message"),
        (['{"event":"start","start":{"callSid":"CA1","streamSid":"MZ1"}}'], 1008, "invalid_caller"),
        (["not json"], 1007, "invalid_json"),
    ],
)
async def test_bad_streams_close_and_are_counted(
    relay: RelayFactory,
    frames: list[str | bytes],
    code: int,
    error: str,
) -> None:
    """A bad stream is closed with its code and counted; a good call beside it is unharmed."""
    async with relay(phone) as (gw, voice):
        good = await TwilioCall(url(gw.port, TWILIO)).stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        async with connect(url(gw.port, TWILIO)) as ws:
            for frame in frames:
                await ws.send(frame)
            await ws.wait_closed()
            assert ws.close_code == code
        await good.dtmf("5")
        await good.wait_for(lambda r: count(good, "mark") == 1)
    assert sample(gw, "hangon_protocol_errors_total", code=error) == 1


async def test_agent_audio_is_never_stored_and_bad_audio_is_rejected(relay: RelayFactory) -> None:
    """In a call's session the agent's audio and marks are relayed, neither stored nor
    numbered, and audio that is not base64 is rejected back to the agent; while no stream is
    attached they are dropped and counted."""
    async with relay(phone) as (gw, voice):
        call = TwilioCall(url(gw.port, TWILIO))
        stream = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        await voice.send(
            {"type": "media", "payload": "AAECAw=="},
            {"type": "media", "payload": "not base64"},
            {"type": "media", "payload": "\u00e9AAA"},  # not even ASCII: the link lives on
            {"type": "say", "text": "hello"},
            {"type": "mark", "name": "m"},
        )
        await stream.wait_for(lambda r: count(stream, "mark") == 1)
        assert [f["event"] for f in stream.received] == ["media", "mark"]
        await voice.wait_for(lambda r: len(voice.of_type("error")) == 2)
        assert {e["code"] for e in voice.of_type("error")} == {"invalid_media"}
        stream.abort()
        await voice.wait_for(lambda r: len(voice.of_type("mark")) == 1)  # Twilio's echo
        async with asyncio.timeout(5):
            while gw.sessions.connections:
                await asyncio.sleep(0.01)
        await voice.send({"type": "media", "payload": "AAECAw=="}, {"type": "say", "text": "2"})
        async with asyncio.timeout(5):
            while sample(gw, "hangon_relay_messages_total", how="stored") < 2:
                await asyncio.sleep(0.01)
        (live,) = gw.sessions.live.values()
        assert live.session is not None and live.session.seq == 2  # the two says only
    dropped = {"direction": "to_caller", "outcome": "dropped"}
    assert sample(gw, "hangon_relay_media_frames_total", **dropped) == 1
    assert sample(gw, "hangon_agent_frames_rejected_total", code="invalid_media") == 2


async def test_media_types_stay_messages_outside_calls(relay: RelayFactory) -> None:
    """For a protocol v1 client, an agent's media, mark and clear are ordinary messages, as
    they were before phone streams existed."""
    async with relay(phone) as (gw, voice):
        caller = Caller(url(gw.port), {"user_id": "u1", "call_id": "web-1"})
        await caller.connect()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        sent = [{"type": "media", "payload": "not audio"}, {"type": "mark"}, {"type": "clear"}]
        await voice.send(*sent)
        await caller.until(lambda f: f["type"] == "msg" and f["seq"] == 3)
        assert caller.messages == sent
        await caller.aclose()
    assert (
        sample(
            gw,
            "hangon_relay_media_frames_total",
            direction="to_caller",
            outcome="dropped",
        )
        == 0
    )


async def test_a_bad_host_header_is_refused_not_an_error(
    relay: RelayFactory, config: Config
) -> None:
    """With a token set, an upgrade whose Host or signature header cannot be used gets 403,
    never a server error."""
    twilio = config.replace("twilio", twilio_auth_token=(TOKEN,))
    async with relay(phone, config=twilio) as (gw, _):
        for extra in (
            "Host: x:abc\r\n",
            "Host: [::1\r\n",
            "Host: a\r\nHost: b\r\n",
            "Host: 127.0.0.1\r\nX-Twilio-Signature: a\r\nX-Twilio-Signature: b\r\n",
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
            writer.write(
                (
                    f"GET {TWILIO} HTTP/1.1\r\n{extra}Upgrade: websocket\r\n"
                    "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                    "Sec-WebSocket-Version: 13\r\n\r\n"
                ).encode()
            )
            status = await asyncio.wait_for(reader.readline(), 5)
            writer.close()
            assert status.split()[1] == b"403", (extra, status)
    assert sample(gw, "hangon_auth_failures_total", reason="twilio_signature") == 4


async def test_twilio_endpoint_can_be_turned_off(relay: RelayFactory, config: Config) -> None:
    """With --twilio-path none the path is 404 like any other."""
    async with relay(phone, config=config.replace("twilio", twilio_path=None)) as (gw, _):
        with pytest.raises(InvalidStatus) as info:
            await TwilioCall(url(gw.port, TWILIO)).stream()
        assert info.value.response.status_code == 404


async def test_audio_waits_for_the_agent_link_but_only_the_newest(
    relay: RelayFactory, config: Config
) -> None:
    """Audio spoken while the agent link is down reaches the agent once it is up, after its
    opening frame: the newest two seconds of it, the older ones dropped and counted."""
    port = free_port()
    cfg = config.replace("agent", downstream=f"ws://127.0.0.1:{port}/", agent_retry_max_delay=0.2)
    async with relay.gateway(cfg) as gw:
        stream = await TwilioCall(url(gw.port, TWILIO)).stream()
        chunks = EARLY_MEDIA + 50
        for n in range(chunks):
            await stream.media(bytes([n % 256]) * CHUNK)
        dropped = {"direction": "to_agent", "outcome": "dropped"}
        async with asyncio.timeout(5):
            while sample(gw, "hangon_relay_media_frames_total", **dropped) < 50:
                await asyncio.sleep(0.01)
        async with TestAgent(port=port) as voice:
            await voice.wait_for(lambda r: len(voice.of_type("media")) == EARLY_MEDIA)
            assert voice.received[0]["type"] == "session.start"
            assert [m["chunk"] for m in voice.of_type("media")] == list(range(51, chunks + 1))
    assert (
        sample(gw, "hangon_relay_media_frames_total", direction="to_agent", outcome="dropped") == 50
    )
    relayed = sample(gw, "hangon_relay_media_frames_total", direction="to_agent", outcome="relayed")
    assert relayed == EARLY_MEDIA


async def test_agent_audio_is_relayed_as_it_is_read(relay: RelayFactory) -> None:
    """The agent's audio for a call goes to the caller from the link's data_received, not
    through its reader task: only the frames that are stored (a say) reach the reader."""
    async with relay(phone) as (gw, voice):
        call = TwilioCall(url(gw.port, TWILIO))
        stream = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        (live,) = gw.sessions.live.values()
        assert live.relay is not None and live.relay.link is not None
        link = live.relay.link
        read: list[str | bytes] = []
        take = link._take

        def reader_takes(on: Any, frame: str | bytes) -> Any:
            read.append(frame)
            return take(on, frame)

        link._take = reader_takes
        for n in range(5):
            payload = base64.b64encode(bytes([n]) * 4).decode()
            await voice.send({"type": "media", "payload": payload})
            await stream.wait_for(lambda r, n=n: count(stream, "media") == n + 1)
        await voice.send({"type": "say", "text": "stored"})
        async with asyncio.timeout(5):
            while not read:
                await asyncio.sleep(0.01)
        audio = [f["media"] for f in stream.received if f["event"] == "media"]
        assert audio_of(audio) == b"".join(bytes([n]) * 4 for n in range(5))
        assert [b'"say"' in (f if isinstance(f, bytes) else f.encode()) for f in read] == [True]


async def test_caller_audio_is_relayed_as_it_is_read(relay: RelayFactory) -> None:
    """A call's audio goes to the agent from the stream's data_received, not through its
    handler's recv: only the frames the handler must act on (a key press) reach it."""
    async with relay(phone) as (gw, voice):
        call = TwilioCall(url(gw.port, TWILIO))
        stream = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        (conn,) = gw.sessions.connections
        read: list[str] = []
        receive = conn.protocol.receive_text

        def handler_reads(text: str) -> Any:
            read.append(text)
            return receive(text)

        conn.protocol.receive_text = handler_reads  # type: ignore[method-assign]
        for n in range(5):
            await stream.media(bytes([n]) * CHUNK)
            await voice.wait_for(lambda r, n=n: len(voice.of_type("media")) == n + 1)
        await stream.dtmf("7")
        async with asyncio.timeout(5):
            while not read:
                await asyncio.sleep(0.01)
        assert audio_of(voice.of_type("media")) == b"".join(bytes([n]) * CHUNK for n in range(5))
        assert read and not any('"media"' in text for text in read), read


class HeldTurns(Wrapper):
    """Delegates to a real store; each turn's write waits until the test releases it."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.entered = asyncio.Event()
        self.release = asyncio.Event()

    async def write_turn(self, *args: Any, **kwargs: Any) -> Any:
        self.entered.set()
        await self.release.wait()
        return await self.inner.write_turn(*args, **kwargs)


async def test_audio_after_a_key_press_waits_for_it(
    relay: RelayFactory, settings: StoreSettings, make_store: StoreFactory
) -> None:
    """The audio a caller sends while its key press is written reaches the agent after the
    key press's turn, though the handler reads on meanwhile: nothing overtakes the turn."""
    store = HeldTurns(make_store(settings))
    async with relay(phone, store=store) as (gw, voice):
        call = TwilioCall(url(gw.port, TWILIO))
        stream = await call.stream()
        await voice.wait_for(lambda r: len(voice.of_type("session.start")) == 1)
        await stream.media(b"\x01" * CHUNK)
        await voice.wait_for(lambda r: len(voice.of_type("media")) == 1)
        await stream.dtmf("5")
        async with asyncio.timeout(5):
            await store.entered.wait()
        try:
            for n in range(5):
                await stream.media(bytes([n]) * CHUNK)
            await asyncio.sleep(0.2)
            assert len(voice.of_type("media")) == 1  # held behind the key press
        finally:
            store.release.set()
        await voice.wait_for(lambda r: len(voice.of_type("media")) == 6)
        kinds = [f["type"] for f in voice.received if f["type"] in ("turn", "media")]
        assert kinds == ["media", "turn"] + ["media"] * 5, kinds
        assert voice.of_type("turn")[0]["dtmf"] == "5"
