"""Twilio Media Streams frame by frame, with no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest
from twilio.request_validator import RequestValidator

from gateway.core import closecodes
from gateway.core.agent import Media
from gateway.core.callerkey import CallerKey
from gateway.core.events import Forward, Hello, Turn
from gateway.core.protocol import Phase
from gateway.core.session import ResumeToken, Session, SessionId
from gateway.core.twilio import (
    MAX_QUEUED_MEDIA,
    STREAM_STOPPED,
    TwilioStream,
    signature,
    signature_valid,
)
from gateway.core.wire import Welcome

CALL = "CA" + "1" * 32
STREAM = "MZ" + "2" * 32
ACCOUNT = "AC" + "3" * 32
SESSION = Session(SessionId("s_1"), ResumeToken("tok"), 0, {}, 1, 2)


def start(params: Any = None, **start: Any) -> str:
    body = {
        "accountSid": ACCOUNT,
        "streamSid": STREAM,
        "callSid": CALL,
        "tracks": ["inbound"],
        "customParameters": {"From": "+1 415 555 0100"} if params is None else params,
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        **start,
    }
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": body, "streamSid": STREAM})


def media(payload: str = "f/8=", **fields: Any) -> str:
    body = {"track": "inbound", "chunk": "3", "timestamp": "40", "payload": payload, **fields}
    return json.dumps({"event": "media", "sequenceNumber": "4", "media": body, "streamSid": STREAM})


def opened(**kwargs: Any) -> TwilioStream:
    stream = TwilioStream(max_message_size=1024, default_region=None, **kwargs)
    assert stream.receive_text('{"event":"connected","protocol":"Call","version":"1.0.0"}') is None
    assert isinstance(stream.receive_text(start()), Hello)
    stream.send_welcome(Welcome(SESSION))
    return stream


def test_start_is_a_hello_for_the_number_and_the_call() -> None:
    """start yields a Hello for the E.164 number and callSid, and keeps the stream for the
    agent."""
    stream = TwilioStream(max_message_size=1024, default_region=None)
    event = stream.receive_text(start({"From": "+1 (415) 555-0100", "tenant": "acme"}))
    assert event == Hello(CallerKey("acme", "phone", "+14155550100", CALL), None, None)
    assert stream.phase is Phase.RESTORING
    assert stream.stream == {
        "provider": "twilio",
        "stream_sid": STREAM,
        "call_sid": CALL,
        "account_sid": ACCOUNT,
        "tracks": ["inbound"],
        "media_format": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        "custom_parameters": {"From": "+1 (415) 555-0100", "tenant": "acme"},
    }


def test_start_copies_only_what_it_checked() -> None:
    """Unknown mediaFormat fields (however deep) are not copied to the agent; missing
    optional fields are None; a long parameter value is kept within its bound."""
    stream = TwilioStream(max_message_size=4096, default_region=None)
    deep = json.loads("[" * 300 + "]" * 300)
    params = {"From": "+14155550100", "note": "n" * 1024}
    event = stream.receive_text(
        start(params, mediaFormat={"encoding": "audio/x-mulaw", "extra": deep}, tracks=None)
    )
    assert isinstance(event, Hello)
    assert stream.stream is not None
    assert stream.stream["media_format"] == {"encoding": "audio/x-mulaw"}
    assert stream.stream["tracks"] is None
    assert stream.stream["custom_parameters"] == params
    bare = TwilioStream(max_message_size=4096, default_region=None)
    body = {"streamSid": STREAM, "callSid": CALL, "customParameters": {"From": "+14155550100"}}
    assert isinstance(bare.receive_text(json.dumps({"event": "start", "start": body})), Hello)
    assert bare.stream is not None
    assert (bare.stream["account_sid"], bare.stream["media_format"]) == (None, None)
    too_long = TwilioStream(max_message_size=4096, default_region=None)
    too_long.receive_text(start({"From": "+14155550100", "note": "n" * 1025}))
    assert too_long.error_code == "invalid_message"


def test_caller_parameter_name_is_configurable() -> None:
    """The caller comes from the configured custom parameter."""
    stream = TwilioStream(max_message_size=1024, caller_param="caller", default_region="US")
    event = stream.receive_text(start({"caller": "(415) 555-0100"}))
    assert isinstance(event, Hello) and event.caller.subject == "+14155550100"


@pytest.mark.parametrize("who", ["client:alice", "anonymous", "sip:bob@example.com"])
def test_a_caller_that_is_not_a_number_is_a_user(who: str) -> None:
    """A Twilio Client identity, SIP URI or anonymous caller is a user ID."""
    event = TwilioStream(max_message_size=1024, default_region=None).receive_text(
        start({"From": who})
    )
    assert event == Hello(CallerKey("default", "user", who, CALL), None, None)


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("nope", "invalid_json"),
        ("[1]", "invalid_message"),
        ('{"event": 5}', "invalid_message"),
        (media(), "unexpected_message"),
        ('{"event":"stop","stop":{}}', "unexpected_message"),
        (start({}), "invalid_caller"),
        (start({"From": ""}), "invalid_caller"),
        (start({"From": "+14155550100", "tenant": "bad tenant"}), "invalid_caller"),
        (start({"From": "x" * 200}), "invalid_caller"),
        (start(["From"]), "invalid_message"),
        (
            json.dumps({"event": "start", "start": {"streamSid": STREAM, "callSid": CALL}}),
            "invalid_caller",
        ),
        # What start copies through to the agent is checked here: depth, size, type, range.
        (
            start({"From": "+14155550100", "x": json.loads("[" * 300 + "]" * 300)}),
            "invalid_message",
        ),
        (start({"From": "+14155550100", "": "x"}), "invalid_message"),
        (start({"From": "+14155550100", **{f"p{i}": "v" for i in range(32)}}), "invalid_message"),
        (start(tracks=json.loads("[" * 300 + "]" * 300)), "invalid_message"),
        (start(tracks=["inbound", "sideways"]), "invalid_message"),
        (start(tracks="inbound"), "invalid_message"),
        (start(mediaFormat="mulaw"), "invalid_message"),
        (start(mediaFormat={"sampleRate": 2**70}), "invalid_message"),
        (start(mediaFormat={"sampleRate": True}), "invalid_message"),
        (start(mediaFormat={"channels": 0}), "invalid_message"),
        (start(mediaFormat={"encoding": 5}), "invalid_message"),
        (start(accountSid={"a": [1]}), "invalid_message"),
        (start(callSid=5), "invalid_message"),
        (start(streamSid="M" * 65), "invalid_message"),
        (json.dumps({"event": "start"}), "invalid_message"),
        ("x" * 1025, "message_too_big"),
        ('{"event":"connected","p":"' + "é" * 600 + '"}', "message_too_big"),
    ],
)
def test_bad_frames_before_start_close_with_their_code(message: str, code: str) -> None:
    """A bad frame closes the stream with the v1 close code of its error and sends nothing."""
    stream = TwilioStream(max_message_size=1024, default_region=None)
    assert stream.receive_text(message) is None
    assert stream.error_code == code and stream.error_message
    assert stream.close_reason is not None and stream.phase is Phase.CLOSED
    assert stream.data_to_send() == []


@pytest.mark.parametrize(
    ("message", "code"),
    [
        (start(), "unexpected_message"),
        (media(payload=5), "invalid_message"),
        (media(chunk=3), "invalid_message"),
        (media(timestamp="-1"), "invalid_message"),
        (media(track=""), "invalid_message"),
        (json.dumps({"event": "media", "media": "x"}), "invalid_message"),
        (json.dumps({"event": "mark", "mark": {}}), "invalid_message"),
        (
            json.dumps({"event": "dtmf", "sequenceNumber": "5", "dtmf": {"digit": "12"}}),
            "invalid_message",
        ),
        (
            json.dumps({"event": "dtmf", "sequenceNumber": 5, "dtmf": {"digit": "1"}}),
            "invalid_message",
        ),
    ],
)
def test_bad_frames_after_start_close_with_their_code(message: str, code: str) -> None:
    """A malformed media, mark or dtmf, or a second start, closes the stream."""
    stream = opened()
    assert stream.receive_text(message) is None
    assert stream.error_code == code


def test_media_goes_to_the_agent_with_numbers_as_numbers() -> None:
    """media becomes a media frame for the agent, chunk and timestamp as integers."""
    event = opened().receive_text(media("AAECAw=="))
    assert isinstance(event, Forward)
    assert json.loads(event.frame) == {
        "type": "media",
        "track": "inbound",
        "chunk": 3,
        "timestamp": 40,
        "payload": "AAECAw==",
    }


def test_media_now_is_the_same_frame_and_leaves_the_rest_untouched() -> None:
    """media_now gives the frame receive_text would forward, only for audio on an open
    stream; for anything else it returns None and changes nothing, so that receive_text,
    given the same text next, acts as it always does."""
    stream = opened()
    event = stream.receive_text(media("AAECAw=="))
    assert isinstance(event, Forward) and stream.media_now(media("AAECAw==")) == event.frame
    for text in (
        json.dumps({"event": "mark", "mark": {"name": "m1"}}),
        media("AAECAw==", chunk=3),  # not a decimal string: bad audio
        "not json",
    ):
        assert stream.media_now(text) is None
        assert stream.phase is Phase.OPEN and stream.error_code is None
    fresh = TwilioStream(max_message_size=1024, default_region=None)
    assert fresh.media_now(media()) is None  # before start
    assert stream.receive_text("not json") is None and stream.error_code is not None


def test_mark_goes_to_the_agent() -> None:
    """A mark Twilio played back goes to the agent by name."""
    event = opened().receive_text(json.dumps({"event": "mark", "mark": {"name": "m1"}}))
    assert isinstance(event, Forward) and json.loads(event.frame) == {"type": "mark", "name": "m1"}


def test_dtmf_is_a_turn_named_by_stream_and_sequence() -> None:
    """A key press is a turn whose ID the same stream never repeats."""
    message = {
        "event": "dtmf",
        "sequenceNumber": "9",
        "dtmf": {"track": "inbound_track", "digit": "#"},
    }
    event = opened().receive_text(json.dumps(message))
    assert event == Turn(f"dtmf-{STREAM}-9", None, None, None, dtmf="#")


def test_stop_closes_normally_and_later_frames_are_ignored() -> None:
    """stop closes with 1000 'stream stopped' (not an error); nothing after it counts."""
    stream = opened()
    assert stream.receive_text(json.dumps({"event": "stop", "stop": {"callSid": CALL}})) is None
    assert stream.close_reason == STREAM_STOPPED and stream.error_code is None
    assert stream.receive_text(media()) is None
    stream.receive_binary(b"x")
    stream.fail("internal_error", "late")
    assert stream.error_code is None and stream.close_reason == STREAM_STOPPED


def test_unknown_events_are_ignored() -> None:
    """An event newer than this gateway is ignored, before and after start."""
    stream = TwilioStream(max_message_size=1024, default_region=None)
    assert stream.receive_text('{"event":"future"}') is None
    assert stream.phase is Phase.AWAIT_HELLO
    assert stream.receive_text(start()) is not None


def test_binary_frames_close_with_1003() -> None:
    """A binary frame is not Twilio's: unsupported_data."""
    stream = opened()
    stream.receive_binary(b"\x00")
    assert stream.error_code == "unsupported_data"
    assert stream.close_reason == closecodes.UNSUPPORTED_DATA


def test_agent_media_mark_and_clear_carry_the_stream_sid() -> None:
    """The agent's frames become Twilio's media, mark and clear for this streamSid."""
    stream = opened()
    sent = []
    for item in (Media("media", "AAEC"), Media("mark", "m1"), Media("clear", "")):
        assert stream.send_media(item)
        sent += stream.data_to_send()  # each sent before the next: the clear drops nothing
    assert [json.loads(f) for f in sent] == [
        {"event": "media", "streamSid": STREAM, "media": {"payload": "AAEC"}},
        {"event": "mark", "streamSid": STREAM, "mark": {"name": "m1"}},
        {"event": "clear", "streamSid": STREAM},
    ]


def test_nothing_else_reaches_twilio() -> None:
    """Stored messages, state and acks have no Twilio message; nothing is queued."""
    stream = opened()
    stream.send_msg(1, b"{}")
    stream.send_state(SESSION)
    stream.send_ack("t", 1)
    assert stream.data_to_send() == []


def test_media_waits_for_the_session_and_is_bounded() -> None:
    """Agent audio is refused before the session opens and past the queue bound; marks and
    clears are not bounded, and a sent queue makes room again."""
    stream = TwilioStream(max_message_size=1024, default_region=None)
    assert not stream.send_media(Media("clear", ""))
    stream.receive_text(start())
    stream.send_welcome(Welcome(SESSION))
    sent = [stream.send_media(Media("media", "AAEC")) for _ in range(MAX_QUEUED_MEDIA + 1)]
    assert sent.count(True) == MAX_QUEUED_MEDIA and sent[-1] is False
    assert stream.send_media(Media("mark", "m"))
    assert len(stream.data_to_send()) == MAX_QUEUED_MEDIA + 1
    assert stream.send_media(Media("media", "AAEC"))


def test_buffered_counts_the_bytes_queued_for_twilio() -> None:
    """The bytes queued for Twilio are counted as they are queued, recounted when a clear
    drops audio, and zero once taken."""
    stream = opened()
    stream.send_media(Media("media", "AAAA"))
    stream.send_media(Media("mark", "m1"))
    counted = stream.buffered
    assert counted == sum(len(f) for f in stream.data_to_send()) and stream.buffered == 0
    stream.send_media(Media("media", "AAAA"))
    stream.send_media(Media("mark", "m2"))
    stream.send_media(Media("clear", ""))
    counted = stream.buffered
    queued = stream.data_to_send()
    assert [json.loads(f)["event"] for f in queued] == ["mark", "clear"]
    assert counted == sum(len(f) for f in queued)


def test_clear_drops_the_audio_still_queued() -> None:
    """A clear drops the audio not yet sent to Twilio, keeps the marks, and goes out itself."""
    stream = opened()
    stream.send_media(Media("media", "AAAA"))
    stream.send_media(Media("mark", "m1"))
    stream.send_media(Media("media", "BBBB"))
    assert stream.send_media(Media("clear", ""))
    assert [json.loads(f)["event"] for f in stream.data_to_send()] == ["mark", "clear"]


def test_frames_after_an_abandoned_hello_are_ignored() -> None:
    """Audio, keys and marks read while the hello is still restoring (the driver gave up on
    it) are ignored; stop still closes."""
    stream = TwilioStream(max_message_size=1024, default_region=None)
    stream.receive_text(start())
    assert stream.receive_text(media()) is None
    assert stream.receive_text(json.dumps({"event": "mark", "mark": {"name": "m"}})) is None
    assert stream.phase is Phase.RESTORING
    stream.receive_text(json.dumps({"event": "stop", "stop": {}}))
    assert stream.close_reason == STREAM_STOPPED


def test_a_welcome_after_close_does_not_reopen() -> None:
    """A stream closed while restoring stays closed."""
    stream = TwilioStream(max_message_size=1024, default_region=None)
    stream.receive_text(start())
    stream.close(closecodes.SERVICE_RESTART)
    stream.close(closecodes.BYE)
    stream.send_welcome(Welcome(SESSION))
    assert stream.phase is Phase.CLOSED and stream.close_reason == closecodes.SERVICE_RESTART


# Signatures: checked against Twilio's own validator, not our reading of its docs.

TOKEN = "12345678901234567890123456789012"


@pytest.mark.parametrize(
    "url",
    ["wss://voice.example.com/v1/twilio", "wss://voice.example.com/v1/twilio?tenant=a%20b"],
)
def test_signature_matches_twilios_sdk(url: str) -> None:
    """Our signature of a URL is the one Twilio's Python SDK computes."""
    assert signature(TOKEN, url) == RequestValidator(TOKEN).compute_signature(url, {})


def test_signature_valid_under_any_configured_token() -> None:
    """A signature under the primary or the secondary token is valid; others are not."""
    url = "wss://voice.example.com/v1/twilio"
    good = RequestValidator(TOKEN).compute_signature(url, {})
    assert signature_valid(["other", TOKEN], url, good)
    assert not signature_valid(["other"], url, good)
    assert not signature_valid([TOKEN], url + "x", good)
    assert not signature_valid([TOKEN], url, None)
    assert not signature_valid([TOKEN], url, "")


@pytest.mark.parametrize(
    ("signed", "seen"),
    [
        ("wss://voice.example.com:443/v1/twilio", "wss://voice.example.com/v1/twilio"),
        ("wss://voice.example.com/v1/twilio", "wss://voice.example.com:443/v1/twilio"),
        ("ws://[::1]/v1/twilio", "ws://[::1]:80/v1/twilio"),
    ],
)
def test_default_port_written_or_not(signed: str, seen: str) -> None:
    """Twilio may sign the URL with or without the default port; both match."""
    assert signature_valid([TOKEN], seen, signature(TOKEN, signed))


@pytest.mark.parametrize(
    ("signed", "seen"),
    [
        ("wss://voice.example.com/v1/twilio", "wss://voice.example.com:8443/v1/twilio"),
        ("wss://a@voice.example.com/v1/twilio", "wss://a@voice.example.com:443/v1/twilio"),
        ("wss:///v1/twilio", "wss:///v1/twilio?x"),
        ("wss://x:abc/v1/twilio", "wss://x:abc/v1/twilio?"),
        ("wss://x:99999/v1/twilio", "wss://x:99999/v1/twilio?"),
        ("wss://[::1/v1/twilio", "wss://[::1/v1/twilio?"),
        ("foo://h/v1/twilio", "foo://h:443/v1/twilio"),
    ],
)
def test_other_urls_must_match_exactly(signed: str, seen: str) -> None:
    """A non-default port, credentials, no host or an unknown scheme: no variants."""
    assert not signature_valid([TOKEN], seen, signature(TOKEN, signed))
