"""The client protocols share one interface, with no event loop."""

from __future__ import annotations

import json

import pytest

from gateway.core.agent import Media
from gateway.core.closecodes import ERRORS, ErrorCode
from gateway.core.events import Hello
from gateway.core.protocol import Protocol
from gateway.core.session import ResumeToken, Session, SessionId
from gateway.core.twilio import TwilioStream
from gateway.core.wire import ClientProtocol, Phase, Welcome, _Invalid
from gateway.exceptions import GatewayError, InvalidInput

SESSION = Session(SessionId("s_1"), ResumeToken("tok"), 0, {}, 1, 2)
HELLO = json.dumps({"type": "hello", "caller": {"phone": "+14155550100", "call_id": "c1"}})
START = json.dumps(
    {
        "event": "start",
        "start": {"streamSid": "MZ1", "callSid": "CA1", "customParameters": {"From": "alice"}},
    }
)


def both(max_message_size: int = 1024) -> list[ClientProtocol]:
    return [
        Protocol(max_message_size=max_message_size),
        TwilioStream(max_message_size=max_message_size, default_region=None),
    ]


def test_both_protocols_are_client_protocols() -> None:
    """Protocol v1 and Twilio streams are ClientProtocols; only Twilio's is a phone."""
    v1, phone = both()
    assert isinstance(v1, ClientProtocol) and isinstance(phone, ClientProtocol)
    assert (Protocol.phone, TwilioStream.phone) == (False, True)
    assert v1.stream is None and v1.error_message is None
    with pytest.raises(TypeError):
        ClientProtocol(max_message_size=64, default_region=None)  # type: ignore[abstract]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("x" * 65, ErrorCode.MESSAGE_TOO_BIG),
        ('"' + "é" * 40 + '"', ErrorCode.MESSAGE_TOO_BIG),
        ("{", ErrorCode.INVALID_JSON),
        ("[1]", ErrorCode.INVALID_MESSAGE),
        ('{"type": 1, "event": 1}', ErrorCode.INVALID_MESSAGE),
    ],
)
def test_every_text_frame_is_checked_alike(data: str, code: ErrorCode) -> None:
    """A frame too big, not JSON, not an object or with no string kind fails either protocol
    with the same code and close."""
    for protocol in both(max_message_size=64):
        assert protocol.receive_text(data) is None
        assert protocol.error_code is code and protocol.close_reason is ERRORS[code]
        assert protocol.phase is Phase.CLOSED
        assert protocol.receive_text(data) is None


def test_fail_is_told_to_v1_and_only_recorded_for_a_phone() -> None:
    """fail queues an error frame on v1 and nothing on Twilio; both record code and message."""
    v1, phone = both()
    for protocol in (v1, phone):
        protocol.fail(ErrorCode.OVERLOADED, "busy", retry_after=2.0)
        protocol.fail(ErrorCode.INTERNAL_ERROR, "ignored once closed")
        assert (protocol.error_code, protocol.error_message) == (ErrorCode.OVERLOADED, "busy")
    (error,) = [json.loads(f) for f in v1.data_to_send()]
    assert error == {
        "type": "error",
        "code": "overloaded",
        "message": "busy",
        "close_code": 1013,
        "reconnect": True,
        "retry_after": 2.0,
    }
    assert phone.data_to_send() == []


def test_only_a_phone_takes_media() -> None:
    """send_media queues the agent's audio for an open phone stream, never for v1."""
    v1, phone = both()
    v1.receive_text(HELLO)
    assert isinstance(phone.receive_text(START), Hello)
    for protocol in (v1, phone):
        protocol.send_welcome(Welcome(SESSION))
        protocol.data_to_send()
    assert v1.send_media(Media("media", "f/8=")) is False
    assert v1.data_to_send() == [] and v1.buffered == 0
    assert phone.send_media(Media("media", "f/8=")) is True
    assert phone.buffered > 0


def test_a_refused_frame_is_invalid_input() -> None:
    """The core's refusal of a client frame is an InvalidInput, named by its code."""
    exc = _Invalid(ErrorCode.INVALID_JSON, "not JSON")
    assert isinstance(exc, InvalidInput) and isinstance(exc, GatewayError)
    assert str(exc) == "invalid_json: not JSON"
