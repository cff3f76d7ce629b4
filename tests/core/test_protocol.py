"""Protocol v1 frame by frame, with no event loop."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gateway.core import closecodes
from gateway.core.events import Ack, Bye, Hello, Turn
from gateway.core.protocol import ERRORS, MAX_INT, Phase, Protocol
from gateway.core.session import ResumeToken, Session, SessionId
from gateway.core.wire import Welcome

CALLER = {"phone": "+14155550100", "call_id": "c1"}


def frame(message: dict[str, Any]) -> str:
    return json.dumps(message)


def frames(protocol: Protocol) -> list[dict[str, Any]]:
    return [json.loads(f) for f in protocol.data_to_send()]


def opened() -> Protocol:
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    session = Session(SessionId("s_1"), ResumeToken("tok"), 3, {"form_answers": {}}, 1, 2)
    protocol.send_welcome(Welcome(session, resumed=True))
    protocol.data_to_send()
    return protocol


def test_hello_yields_normalised_caller() -> None:
    """A hello produces a Hello event with the E.164 caller and moves to RESTORING."""
    protocol = Protocol(max_message_size=1024)
    event = protocol.receive_text(
        frame(
            {
                "type": "hello",
                "caller": {"phone": "+1 (415) 555-0100", "call_id": "c1"},
                "tenant": "acme",
                "resume_token": "tok",
                "last_seq": 4,
                "token": "eyJ.x.y",
            }
        )
    )
    assert isinstance(event, Hello)
    assert event.caller.subject == "+14155550100"
    assert event.caller.tenant == "acme"
    assert (event.resume_token, event.last_seq, event.token) == ("tok", 4, "eyJ.x.y")
    assert protocol.phase is Phase.RESTORING
    assert protocol.data_to_send() == []


def test_welcome_frame_carries_session() -> None:
    """send_welcome queues a welcome with state, version and token and opens the session."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    session = Session(SessionId("s_1"), ResumeToken("tok"), 0, {"context": {}}, 1, 1)
    protocol.send_welcome(Welcome(session, stale=True))
    (welcome,) = frames(protocol)
    assert welcome == {
        "type": "welcome",
        "protocol": 1,
        "session_id": "s_1",
        "resumed": False,
        "state": {"context": {}},
        "version": 0,
        "seq": 0,
        "replay": "full",
        "resume_token": "tok",
        "stale": True,
    }
    assert protocol.phase is Phase.OPEN


def test_degraded_welcome_then_the_real_one_and_nacks() -> None:
    """A degraded welcome says so; a second welcome follows on the open connection; a nack
    names its turn and when to send it again, keeps the connection open, and is not sent
    once closed."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    session = Session(SessionId("s_1"), ResumeToken(""), 0, {}, 1, 1)
    protocol.send_welcome(Welcome(session, degraded=True))
    protocol.send_nack("t1", "store_unavailable", "later", retry_after=1.5)
    protocol.send_welcome(Welcome(session, resumed=True))
    first, nack, second = frames(protocol)
    assert first["degraded"] is True and "degraded" not in second
    assert nack == {
        "type": "nack",
        "turn_id": "t1",
        "code": "store_unavailable",
        "message": "later",
        "retry_after": 1.5,
    }
    assert protocol.phase is Phase.OPEN and protocol.close_reason is None
    protocol.fail("internal_error", "x")
    frames(protocol)
    protocol.send_nack("t2", "store_unavailable", "later", retry_after=1.0)
    assert frames(protocol) == []


def test_turn_and_bye_events() -> None:
    """An open session yields Turn events with their fields, then Bye."""
    protocol = opened()
    event = protocol.receive_text(
        frame({"type": "turn", "turn_id": "t1", "text": "hi", "form": {"name": "Ada"}})
    )
    assert event == Turn("t1", "hi", {"name": "Ada"}, None)
    protocol.send_ack("t1", 4)
    assert frames(protocol) == [{"type": "ack", "turn_id": "t1", "version": 4}]
    assert protocol.receive_text(frame({"type": "bye"})) == Bye()


def test_unknown_fields_are_ignored() -> None:
    """Fields a v1 gateway does not know are ignored, so clients can add them."""
    protocol = opened()
    event = protocol.receive_text(frame({"type": "turn", "turn_id": "t1", "future": [1]}))
    assert event == Turn("t1", None, None, None)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        ("{not json", "invalid_json"),
        ("[1, 2]", "invalid_message"),
        (frame({"no": "type"}), "invalid_message"),
        (frame({"type": 7}), "invalid_message"),
        (frame({"type": "dance"}), "unknown_type"),
        (frame({"type": "turn", "turn_id": "t1"}), "unexpected_message"),
        (frame({"type": "bye"}), "unexpected_message"),
        (frame({"type": "hello"}), "invalid_message"),
        (frame({"type": "hello", "caller": CALLER, "last_seq": -1}), "invalid_message"),
        (frame({"type": "hello", "caller": CALLER, "last_seq": True}), "invalid_message"),
        # Past what Lua and JavaScript hold exactly: refused here, before any store sees it.
        (frame({"type": "hello", "caller": CALLER, "last_seq": 2**53}), "invalid_message"),
        (frame({"type": "hello", "caller": CALLER, "last_seq": 2**62}), "invalid_message"),
        (frame({"type": "hello", "caller": CALLER, "resume_token": 5}), "invalid_message"),
        (frame({"type": "hello", "caller": {"phone": "12", "call_id": "c"}}), "invalid_caller"),
        (frame({"type": "hello", "caller": "me"}), "invalid_caller"),
        ("x" * 2000, "message_too_big"),
        ('"' + "é" * 600 + '"', "message_too_big"),
    ],
)
def test_bad_frame_before_hello_fails(data: str, code: str) -> None:
    """Each bad frame queues one error frame with its close code and closes the protocol."""
    protocol = Protocol(max_message_size=1024)
    assert protocol.receive_text(data) is None
    (error,) = frames(protocol)
    reason = ERRORS[code]
    assert error["type"] == "error"
    assert error["code"] == code
    assert error["close_code"] == reason.code
    assert error["reconnect"] is reason.reconnect
    assert error["message"]
    assert protocol.close_reason is reason
    assert protocol.error_code == code
    assert protocol.phase is Phase.CLOSED


@pytest.mark.parametrize(
    "message",
    [
        {"type": "turn"},
        {"type": "turn", "turn_id": ""},
        {"type": "turn", "turn_id": 5},
        {"type": "turn", "turn_id": "x" * 129},
        {"type": "turn", "turn_id": "t", "text": 5},
        {"type": "turn", "turn_id": "t", "form": ["a"]},
        {"type": "turn", "turn_id": "t", "context": "c"},
    ],
)
def test_malformed_turn_fails(message: dict[str, Any]) -> None:
    """A turn with a missing or wrongly typed field is invalid_message, close 1007."""
    protocol = opened()
    assert protocol.receive_text(frame(message)) is None
    assert frames(protocol)[0]["code"] == "invalid_message"
    assert protocol.close_reason == closecodes.INVALID_PAYLOAD


def test_second_hello_is_unexpected() -> None:
    """A hello on an open session is unexpected_message, close 1008."""
    protocol = opened()
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    assert frames(protocol)[0]["code"] == "unexpected_message"
    assert protocol.close_reason == closecodes.POLICY_VIOLATION


def test_binary_frame_fails() -> None:
    """A binary frame is unsupported_data, close 1003."""
    protocol = opened()
    protocol.receive_binary(b"\x00\x01")
    assert frames(protocol)[0]["code"] == "unsupported_data"
    assert protocol.close_reason == closecodes.UNSUPPORTED_DATA


def test_nothing_after_close() -> None:
    """After a failure, further frames and failures produce nothing."""
    protocol = opened()
    protocol.receive_binary(b"x")
    protocol.data_to_send()
    assert protocol.receive_text(frame({"type": "bye"})) is None
    protocol.receive_binary(b"x")
    protocol.fail("internal_error", "again")
    protocol.close(closecodes.BYE)
    assert protocol.data_to_send() == []
    assert protocol.close_reason == closecodes.UNSUPPORTED_DATA


def test_close_without_error() -> None:
    """close() sets the reason without an error frame (bye)."""
    protocol = opened()
    protocol.close(closecodes.BYE)
    assert protocol.data_to_send() == []
    assert protocol.close_reason == closecodes.BYE
    assert protocol.error_code is None


def test_frame_at_limit_is_accepted() -> None:
    """A frame of exactly max_message_size bytes is parsed, not refused."""
    protocol = opened()
    base = frame({"type": "turn", "turn_id": "t", "text": ""})
    data = base[:-2] + "a" * (1024 - len(base)) + '"}'
    assert len(data.encode()) == 1024
    assert isinstance(protocol.receive_text(data), Turn)


def test_hello_requires_caller() -> None:
    """A hello without a caller is invalid_message, close 1007."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "resume_token": "tok"}))
    assert frames(protocol)[0]["code"] == "invalid_message"


def test_hello_token_length_is_bounded() -> None:
    """An empty or oversized resume token or signed token is invalid_message."""
    for token in ("", "t" * 257):
        protocol = Protocol(max_message_size=4096)
        protocol.receive_text(frame({"type": "hello", "caller": CALLER, "resume_token": token}))
        assert frames(protocol)[0]["code"] == "invalid_message"
    for token in ("", "t" * 8193):
        protocol = Protocol(max_message_size=16384)
        protocol.receive_text(frame({"type": "hello", "caller": CALLER, "token": token}))
        assert frames(protocol)[0]["code"] == "invalid_message"


def test_nothing_queued_after_error() -> None:
    """Once an error frame is queued, a welcome or ack is not sent after it."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    protocol.fail("store_unavailable", "down")
    session = Session(SessionId("s_1"), ResumeToken("tok"), 0, {}, 1, 1)
    protocol.send_welcome(Welcome(session))
    protocol.send_ack("t1", 1)
    assert [f["type"] for f in frames(protocol)] == ["error"]


def nested(levels: int) -> dict[str, Any]:
    """An object nesting ``levels`` levels deep, counting itself as level 1."""
    value: Any = 1
    for _ in range(levels - 1):
        value = [value]
    return {"k": value}


@pytest.mark.parametrize(
    ("field", "value", "ok"),
    [
        ("form", {"a": [[{"b": 1}]] * 3, "c": "x"}, True),
        ("form", nested(32), True),
        ("context", nested(32), True),
        ("context", {"k": [nested(31)]}, False),
        ("form", nested(33), False),
        ("form", nested(300), False),
    ],
)
def test_nesting_is_bounded(field: str, value: dict[str, Any], ok: bool) -> None:
    """form and context may nest 32 levels (the object itself is level 1), not more."""
    protocol = opened()
    event = protocol.receive_text(frame({"type": "turn", "turn_id": "t", field: value}))
    if ok:
        assert isinstance(event, Turn)
    else:
        (error,) = frames(protocol)
        assert (error["code"], error["close_code"]) == ("invalid_message", 1007)
        assert f"field '{field}' nests deeper than 32" in error["message"]


def test_ack_event() -> None:
    """An ack on an open session yields Ack with its seq and keeps the session open."""
    protocol = opened()
    assert protocol.receive_text(frame({"type": "ack", "seq": 0})) == Ack(0)
    assert protocol.receive_text(frame({"type": "ack", "seq": 12, "extra": 1})) == Ack(12)
    assert protocol.receive_text(frame({"type": "ack", "seq": MAX_INT})) == Ack(MAX_INT)
    assert protocol.phase is Phase.OPEN
    assert protocol.data_to_send() == []


@pytest.mark.parametrize(
    "message",
    [
        {"type": "ack"},
        {"type": "ack", "seq": None},
        {"type": "ack", "seq": -1},
        {"type": "ack", "seq": MAX_INT + 1},
        {"type": "ack", "seq": 2**64},
        {"type": "ack", "seq": True},
        {"type": "ack", "seq": False},
        {"type": "ack", "seq": "3"},
        {"type": "ack", "seq": 3.0},
        {"type": "ack", "seq": [3]},
    ],
)
def test_malformed_ack_fails(message: dict[str, Any]) -> None:
    """An ack whose seq is missing or not a non-negative integer is invalid_message, close 1007."""
    protocol = opened()
    assert protocol.receive_text(frame(message)) is None
    (error,) = frames(protocol)
    assert error["code"] == "invalid_message"
    assert "'seq'" in error["message"]
    assert protocol.close_reason == closecodes.INVALID_PAYLOAD


def test_now_is_the_same_event_and_leaves_the_rest_untouched() -> None:
    """now gives the turn or ack receive_text would, only on an open connection; for
    anything else (a bye, a ping, a bad turn or ack, a frame before the welcome) it
    returns None and changes nothing, so that receive_text, given the same text next,
    acts as it always does."""
    protocol = opened()
    turn = frame({"type": "turn", "turn_id": "t1", "text": "hi", "form": {"a": 1}})
    assert protocol.now(turn) == protocol.receive_text(turn) == Turn("t1", "hi", {"a": 1}, None)
    ack = frame({"type": "ack", "seq": 7})
    assert protocol.now(ack) == protocol.receive_text(ack) == Ack(7)
    for text in (
        frame({"type": "bye"}),
        frame({"type": "ping"}),
        frame({"type": "turn"}),  # no turn_id
        frame({"type": "turn", "turn_id": "t2", "form": nested(40)}),
        frame({"type": "ack", "seq": -1}),
        frame({"type": "hello", "caller": CALLER}),
        "x" * 2000,  # past the size limit
        "not json",
    ):
        assert protocol.now(text) is None
        assert protocol.phase is Phase.OPEN and protocol.error_code is None
        assert protocol.data_to_send() == []
    fresh = Protocol(max_message_size=1024)
    assert fresh.now(turn) is None  # before the hello
    assert protocol.receive_text("not json") is None and protocol.error_code is not None
    assert protocol.now(turn) is None  # once closed


def test_ack_before_welcome_is_unexpected() -> None:
    """An ack before hello, or while the session is restoring, is unexpected_message, close 1008."""
    protocol = Protocol(max_message_size=1024)
    assert protocol.receive_text(frame({"type": "ack", "seq": 1})) is None
    assert frames(protocol)[0]["code"] == "unexpected_message"
    assert protocol.close_reason == closecodes.POLICY_VIOLATION
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    assert protocol.receive_text(frame({"type": "ack", "seq": 1})) is None
    assert frames(protocol)[0]["code"] == "unexpected_message"


def test_send_msg_embeds_data_verbatim() -> None:
    """send_msg queues a msg frame with the seq and the agent's JSON bytes unchanged."""
    protocol = opened()
    data = r'{"type": "say",  "text": "h\u00e9 \"x\" é", "n": [1.50, null]}'.encode()
    protocol.send_msg(7, data)
    protocol.send_msg(8, b'{"type":"x"}')
    first, second = protocol.data_to_send()
    assert first.endswith(b',"data":' + data + b"}")
    assert json.loads(first) == {"type": "msg", "seq": 7, "data": json.loads(data)}
    assert json.loads(second) == {"type": "msg", "seq": 8, "data": {"type": "x"}}


def test_send_state_frame() -> None:
    """send_state queues the session's version and state."""
    protocol = opened()
    session = Session(SessionId("s_1"), ResumeToken("tok"), 5, {"context": {"k": [1]}}, 1, 2)
    protocol.send_state(session)
    assert frames(protocol) == [{"type": "state", "version": 5, "state": {"context": {"k": [1]}}}]


def test_msg_and_state_only_when_open() -> None:
    """send_msg and send_state queue nothing before welcome, nor after the session closed."""
    session = Session(SessionId("s_1"), ResumeToken("tok"), 5, {}, 1, 2)
    protocol = Protocol(max_message_size=1024)
    protocol.send_msg(1, b"{}")
    protocol.send_state(session)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    protocol.send_msg(1, b"{}")
    protocol.send_state(session)
    assert protocol.data_to_send() == []
    protocol.send_welcome(Welcome(session))
    protocol.send_msg(1, b"{}")
    protocol.close(closecodes.BYE)
    protocol.send_msg(2, b"{}")
    protocol.send_state(session)
    assert [f["type"] for f in frames(protocol)] == ["welcome", "msg"]
    failed = opened()
    failed.fail("session_replaced", "newer")
    failed.send_msg(1, b"{}")
    failed.send_state(session)
    assert [f["type"] for f in frames(failed)] == ["error"]


def test_welcome_with_partial_replay() -> None:
    """A welcome with replay_from says the replay is partial and where it starts."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    session = Session(SessionId("s_1"), ResumeToken("tok"), 2, {}, 1, 1, seq=40, epoch=4)
    protocol.send_welcome(Welcome(session, resumed=True, replay_from=31))
    (welcome,) = frames(protocol)
    assert welcome["resumed"] is True
    assert (welcome["seq"], welcome["replay"], welcome["replay_from"]) == (40, "partial", 31)
    assert "stale" not in welcome
    assert "epoch" not in welcome


def test_ping_is_answered_with_pong_in_every_phase_but_closed() -> None:
    """A ping (the heartbeat of browsers, which cannot send WebSocket pings) gets a pong
    before hello, while restoring and when open, and changes nothing else."""
    protocol = Protocol(max_message_size=1024)
    assert protocol.receive_text(frame({"type": "ping"})) is None
    assert frames(protocol) == [{"type": "pong"}]
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    assert protocol.phase is Phase.RESTORING
    assert protocol.receive_text(frame({"type": "ping"})) is None
    assert frames(protocol) == [{"type": "pong"}]
    open_ = opened()
    frames(open_)
    assert open_.receive_text(frame({"type": "ping"})) is None
    assert frames(open_) == [{"type": "pong"}]
    assert open_.phase is Phase.OPEN and open_.close_reason is None
    open_.close(closecodes.BYE)
    assert open_.receive_text(frame({"type": "ping"})) is None
    assert frames(open_) == []


def test_overloaded_error_says_when_to_come_back() -> None:
    """An overloaded gateway's error frame carries retry_after and closes with 1013."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "hello", "caller": CALLER}))
    protocol.fail("overloaded", "later", retry_after=1.5)
    (error,) = frames(protocol)
    assert error["retry_after"] == 1.5 and error["close_code"] == 1013 and error["reconnect"]
    assert protocol.close_reason == closecodes.OVERLOADED


def test_buffered_counts_the_bytes_queued() -> None:
    """The bytes and frames queued are counted until the driver takes them."""
    protocol = Protocol(max_message_size=1024)
    protocol.receive_text(frame({"type": "ping"}))
    protocol.fail("rate_limited", "slow down", retry_after=1.0)
    counted, queued = protocol.buffered, protocol.queued
    taken = protocol.data_to_send()
    assert counted == sum(len(f) for f in taken) and queued == len(taken) == 2
    assert protocol.buffered == 0 and protocol.queued == 0
