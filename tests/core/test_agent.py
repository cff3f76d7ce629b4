"""The downstream agent protocol frame by frame, with no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.core.agent import (
    AGENT_ERRORS,
    AgentMessage,
    InvalidAgentFrame,
    Media,
    StatePatch,
    caller_object,
    error_frame,
    parse_frame,
    session_end,
    session_open,
    turn_frame,
)
from gateway.core.callerkey import CallerKey
from gateway.core.events import Turn
from gateway.core.session import ResumeToken, Session, SessionId

PHONE = CallerKey("acme", "phone", "+14155550100", "c1")
USER = CallerKey("default", "user", "u-1", "c2")
STATE = {"context": {"lang": "en"}, "form_answers": {"name": "Ada"}, "last_turn": None}


def session() -> Session:
    return Session(SessionId("s_1"), ResumeToken("tok"), 7, STATE, 1, 2)


def frame(message: Any) -> str:
    return json.dumps(message)


def nested(levels: int) -> dict[str, Any]:
    """An object nesting ``levels`` levels deep, counting itself as level 1."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return {"k": value}


def state(patch: Any) -> str:
    return frame({"type": "state", "patch": patch})


@pytest.mark.parametrize(
    "data",
    [
        '{"type":"say","text":"hi"}',
        '  {"type": "say",\n "text": "h\\u00e9", "n": [1, 2.50]}  ',
        '{"type":"é","extra":{"type":"state","patch":5}}',
        '{"type":"","patch":{"bogus":1}}',
    ],
)
def test_any_typed_object_is_a_message_with_its_exact_bytes(data: str) -> None:
    """An object with a string type other than state is a message that keeps the frame's bytes."""
    parsed = parse_frame(data, max_size=1024)
    assert parsed == AgentMessage(data.encode())


def test_state_frame_becomes_patch() -> None:
    """A state frame yields its patch, nulls and extra fields left as they are."""
    patch = {"form_answers": {"name": "Bo", "date": None}, "context": {"k": nested(31)}}
    parsed = parse_frame(frame({"type": "state", "patch": patch, "note": 1}), max_size=4096)
    assert parsed == StatePatch(patch)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b'{"type":"say"}', "unsupported_data"),
        ("x" * 1025, "message_too_big"),
        ('"' + "é" * 512 + '"', "message_too_big"),
        ("{not json", "invalid_json"),
        ("", "invalid_json"),
        ('{"type":"say"', "invalid_json"),
        ("[1, 2]", "invalid_message"),
        ('"state"', "invalid_message"),
        ("null", "invalid_message"),
        (frame({"no": "type"}), "invalid_message"),
        (frame({"type": 7}), "invalid_message"),
        (frame({"type": None}), "invalid_message"),
        (frame({"type": ["state"]}), "invalid_message"),
        (frame({"type": "state"}), "invalid_patch"),
        (state(None), "invalid_patch"),
        (state({}), "invalid_patch"),
        (state([{"context": {}}]), "invalid_patch"),
        (state("context"), "invalid_patch"),
        (state({"last_turn": {"turn_id": "t"}}), "invalid_patch"),
        (state({"context": {}, "version": {}}), "invalid_patch"),
        (state({"context": None}), "invalid_patch"),
        (state({"form_answers": ["a"]}), "invalid_patch"),
        (state({"form_answers": "a"}), "invalid_patch"),
        (state({"context": nested(33)}), "invalid_patch"),
        (state({"context": {"k": [nested(31)]}}), "invalid_patch"),
        (state({"form_answers": {}, "context": nested(300)}), "invalid_patch"),
    ],
)
def test_bad_frames_are_rejected(data: str | bytes, code: str) -> None:
    """Each bad frame raises InvalidAgentFrame with its code, which AGENT_ERRORS documents."""
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(data, max_size=1024)
    assert info.value.code == code
    assert code in AGENT_ERRORS
    assert info.value.message
    assert str(info.value) == f"{code}: {info.value.message}"


def test_size_limit_counts_utf8_bytes() -> None:
    """A frame of exactly max_size UTF-8 bytes is accepted; one byte more is message_too_big."""
    base = '{"type":"say","text":""}'
    data = base[:-2] + "é" * ((1024 - len(base)) // 2) + '"}'
    assert len(data.encode()) == 1024
    assert len(data) < 1024
    assert parse_frame(data, max_size=1024) == AgentMessage(data.encode())
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(data, max_size=1023)
    assert info.value.code == "message_too_big"


@pytest.mark.parametrize("field", ["form_answers", "context"])
def test_patch_nesting_is_bounded(field: str) -> None:
    """A patch field may nest 32 levels (the field's object is level 1), not 33."""
    assert parse_frame(state({field: nested(32)}), max_size=4096) == StatePatch({field: nested(32)})
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(state({field: nested(33)}), max_size=4096)
    assert info.value.code == "invalid_patch"
    assert "deeper than 32" in info.value.message


def test_unknown_patch_key_is_named_and_truncated() -> None:
    """A patch key other than form_answers and context is named, cut to 40 characters."""
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(state({"k" * 100: {}}), max_size=1024)
    assert info.value.code == "invalid_patch"
    assert repr("k" * 40) in info.value.message
    assert "k" * 41 not in info.value.message


def test_caller_object() -> None:
    """The agent sees a phone caller by phone and a user caller by user_id, with tenant and call."""
    assert caller_object(PHONE) == {"tenant": "acme", "phone": "+14155550100", "call_id": "c1"}
    assert caller_object(USER) == {"tenant": "default", "user_id": "u-1", "call_id": "c2"}


def test_session_start_frame() -> None:
    """session.start carries the session, caller, state and version, and no reason."""
    assert json.loads(session_open(session(), PHONE, kind="session.start")) == {
        "type": "session.start",
        "session_id": "s_1",
        "caller": {"tenant": "acme", "phone": "+14155550100", "call_id": "c1"},
        "state": STATE,
        "version": 7,
    }


def test_session_resume_frame() -> None:
    """session.resume carries the same fields plus its reason."""
    data = session_open(session(), USER, kind="session.resume", reason="agent_reconnected")
    assert json.loads(data) == {
        "type": "session.resume",
        "session_id": "s_1",
        "caller": {"tenant": "default", "user_id": "u-1", "call_id": "c2"},
        "state": STATE,
        "version": 7,
        "reason": "agent_reconnected",
    }


def test_session_open_with_a_phone_stream() -> None:
    """A session opened by a phone stream tells the agent which stream, for its audio."""
    stream = {"provider": "twilio", "stream_sid": "MZ1", "call_sid": "CA1"}
    data = session_open(session(), PHONE, kind="session.resume", reason="x", stream=stream)
    assert json.loads(data)["stream"] == stream


@pytest.mark.parametrize(
    ("data", "media"),
    [
        ('{"type":"media","payload":"AAECAw=="}', Media("media", "AAECAw==")),
        ('{"type":"mark","name":"greeting-done","extra":1}', Media("mark", "greeting-done")),
        ('{"type":"clear"}', Media("clear", "")),
    ],
)
def test_media_mark_and_clear_are_for_the_phone(data: str, media: Media) -> None:
    """In a phone call's session media, mark and clear are for its stream; in any other they
    are messages, as before phone streams existed."""
    assert parse_frame(data, max_size=1024, phone=True) == media
    assert parse_frame(data, max_size=1024) == AgentMessage(data.encode())


@pytest.mark.parametrize(
    "data",
    [
        '{"type":"media"}',
        '{"type":"media","payload":""}',
        '{"type":"media","payload":5}',
        '{"type":"media","payload":"not base64!"}',
        '{"type":"media","payload":"AAE"}',
        '{"type":"media","payload":"\u00e9AAA"}',
        '{"type":"mark"}',
        '{"type":"mark","name":"' + "m" * 257 + '"}',
    ],
)
def test_bad_media_frames_are_rejected(data: str) -> None:
    """A media frame needs a base64 payload and a mark a name of at most 256 characters."""
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(data, max_size=1024, phone=True)
    assert info.value.code == "invalid_media"


@pytest.mark.parametrize(
    ("turn", "present"),
    [
        (Turn("t1", None, None, None), {}),
        (Turn("t1", "hi", None, None), {"text": "hi"}),
        (Turn("t1", "", {}, {}), {"text": "", "form": {}, "context": {}}),
        (
            Turn("t1", "hi", {"name": "Ada"}, {"k": [1]}),
            {"text": "hi", "form": {"name": "Ada"}, "context": {"k": [1]}},
        ),
        (Turn("t1", None, None, None, dtmf="5"), {"dtmf": "5"}),
    ],
)
def test_turn_frame(turn: Turn, present: dict[str, Any]) -> None:
    """A turn frame has the session's version and only the optional fields the turn has."""
    assert json.loads(turn_frame(session(), turn)) == {
        "type": "turn",
        "session_id": "s_1",
        "turn_id": "t1",
        "version": 7,
        **present,
    }


def test_session_end_frame() -> None:
    """session.end names the session and nothing else."""
    assert json.loads(session_end(session())) == {"type": "session.end", "session_id": "s_1"}


def test_error_frame() -> None:
    """An error frame tells the agent the code and message of the rejection."""
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(b"\x00", max_size=1024)
    assert json.loads(error_frame(info.value)) == {
        "type": "error",
        "code": "unsupported_data",
        "message": info.value.message,
    }
    assert json.loads(error_frame(InvalidAgentFrame("state_too_big", "too much"))) == {
        "type": "error",
        "code": "state_too_big",
        "message": "too much",
    }


def test_message_nesting_is_bounded() -> None:
    """A message may nest 32 levels (the frame is level 1), not 33: the msg frame that
    wraps it must stay parseable by every client."""
    ok = '{"type":"say","d":' + "[" * 31 + "]" * 31 + "}"
    assert parse_frame(ok, max_size=4096) == AgentMessage(ok.encode())
    deep = '{"type":"say","d":' + "[" * 1023 + "]" * 1023 + "}"
    with pytest.raises(InvalidAgentFrame) as info:
        parse_frame(deep, max_size=8192)
    assert info.value.code == "invalid_message"
    assert "deeper than 32" in info.value.message
