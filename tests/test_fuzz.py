"""Hypothesis throws random and mutated frames, and frame sequences, at a live gateway
process. It must never crash or answer with an unexpected error, never show one caller
another's data, and keep serving a well-behaved session beside the fuzzed ones.

The number of inputs tried is written to ``test-artifacts/fuzz.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gateway.core.protocol import ERRORS
from tests.authkeys import keys_document, token
from tests.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
SECRET = "Bystander-Secret-4155550123"
BYSTANDER = {"user_id": "bystander", "call_id": "fuzz"}
FUZZER = {"user_id": "fuzzer", "call_id": "fuzz"}
EXAMPLES = int(os.environ.get("HANGON_FUZZ_EXAMPLES", "1500"))
CLOSE_CODES = {reason.code for reason in ERRORS.values()} | {1000, 1009, 1011, 1012}

# What a fuzzed frame is built from: the protocol's own vocabulary, and junk.
TYPES = st.sampled_from(["hello", "turn", "ack", "bye", "ping", "welcome", "", "HELLO", None])
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=40),
    st.sampled_from(["+14155550100", "+1 415 555 0199", "bystander", "fuzz", "acme", "0" * 300]),
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
CALLERS = st.one_of(
    st.fixed_dictionaries({"phone": SCALARS, "call_id": SCALARS}),
    st.fixed_dictionaries({"user_id": SCALARS, "call_id": SCALARS}),
    # The bystander's own caller key, with the fuzzer's valid token or a guessed one: a
    # hijack attempt. And the fuzzer's, which its token opens, so turns get through.
    st.just(BYSTANDER),
    st.just(FUZZER),
    st.just(FUZZER),
    JSON,
)
TOKENS = st.one_of(
    SCALARS,
    st.builds(lambda: token(FUZZER)),
    st.builds(lambda: token(FUZZER, tenant="globex")),
    st.builds(lambda: token(FUZZER)[:-3] + "abc"),
)
MESSAGES = st.one_of(
    st.fixed_dictionaries(
        {"type": st.just("hello"), "caller": CALLERS},
        optional={
            "tenant": st.one_of(SCALARS, st.just("acme")),
            "resume_token": SCALARS,
            "last_seq": SCALARS,
            "token": TOKENS,
        },
    ),
    st.fixed_dictionaries(
        {"type": st.just("turn"), "turn_id": SCALARS},
        optional={"text": SCALARS, "form": JSON, "context": JSON},
    ),
    st.fixed_dictionaries({"type": st.just("ack"), "seq": SCALARS}),
    st.fixed_dictionaries({"type": TYPES}, optional={"x": JSON}),
    JSON,
)


def nested(depth: int) -> str:
    return '{"type":"turn","turn_id":"d","form":{"a":' + "[" * depth + "]" * depth + "}}"


FRAMES = st.one_of(
    MESSAGES.map(lambda m: json.dumps(m)),
    # Mutations of valid frames: cut, bytes flipped, deep nesting, binary, huge.
    MESSAGES.map(lambda m: json.dumps(m)).flatmap(
        lambda text: st.integers(0, max(0, len(text) - 1)).map(lambda n: text[:n])
    ),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.integers(1, 2000).map(nested),
    st.sampled_from(
        [
            "x" * 70_000,
            '{"type":"hello"' + " " * 66_000 + "}",
            "\ud800".encode("utf-8", "surrogatepass").decode("latin-1"),
        ]
    ),
)


GOOD_HELLO = st.builds(
    lambda last_seq: json.dumps(
        {"type": "hello", "caller": FUZZER, "tenant": "acme", "token": token(FUZZER), **last_seq}
    ),
    st.one_of(st.just({}), st.fixed_dictionaries({"last_seq": st.integers(0, 5)})),
)
GOOD_TURN = st.builds(
    lambda turn_id, form: json.dumps({"type": "turn", "turn_id": turn_id, "form": form}),
    st.text(min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=8), SCALARS, max_size=3),
)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    log, keys = workdir / "gateway.log", workdir / "keys.json"
    keys.write_text(keys_document())
    gw = GatewayProcess(
        log, "--downstream", "off", "--max-turns-per-second", "none", "--auth-keys", str(keys)
    )
    gw.start()
    yield gw
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
    gw.terminate()
    text = log.read_text()
    assert "Traceback" not in text and "unexpected error" not in text


@pytest.fixture(scope="module")
def bystander(gateway: GatewayProcess) -> Iterator[ClientConnection]:
    with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        ws.send(
            json.dumps(
                {"type": "hello", "caller": BYSTANDER, "tenant": "acme", "token": token(BYSTANDER)}
            )
        )
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
        ws.send(json.dumps({"type": "turn", "turn_id": "b1", "form": {"secret": SECRET}}))
        assert json.loads(ws.recv(timeout=5))["version"] == 1
        yield ws


def exchange(port: int, frames: list[str | bytes]) -> list[Any]:
    """Send ``frames`` on a fresh connection; return what came back, and the close code."""
    got: list[Any] = []
    try:
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=None, open_timeout=5) as ws:
            try:
                for frame in frames:
                    ws.send(frame)
                while True:
                    got.append(ws.recv(timeout=0.05))
            except TimeoutError:
                pass
            except ConnectionClosed:
                pass
            code = ws.close_code
    except InvalidStatus as exc:  # refused upgrade: only a 503 under load is expected
        assert exc.response.status_code == 503
        return got
    if code is not None:
        got.append(code)
    return got


TRIED = {"examples": 0, "frames": 0, "welcomed": 0, "acked": 0}


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    frames=st.one_of(
        st.lists(FRAMES, min_size=1, max_size=6),
        # A proper hello first, so that what follows is fuzzed inside an open session.
        st.tuples(GOOD_HELLO, st.lists(st.one_of(GOOD_TURN, FRAMES), max_size=6)).map(
            lambda t: [t[0], *t[1]]
        ),
    )
)
def test_fuzzed_frames_harm_nobody(
    gateway: GatewayProcess, bystander: ClientConnection, frames: list[str | bytes]
) -> None:
    """Whatever arrives, each answer is a JSON frame or a documented close code, no answer
    carries the bystander's data, and the bystander's session keeps working."""
    TRIED["examples"] += 1
    TRIED["frames"] += len(frames)
    for answer in exchange(gateway.port, frames):
        if isinstance(answer, int):
            assert answer in CLOSE_CODES
            continue
        assert SECRET not in answer
        frame = json.loads(answer)
        TRIED["welcomed"] += frame.get("type") == "welcome"
        TRIED["acked"] += frame.get("type") == "ack"
        if frame.get("type") == "error":
            assert frame["code"] in ERRORS and frame["code"] != "internal_error"
    if TRIED["examples"] % 25 == 0:
        bystander.send(json.dumps({"type": "ping"}))
        assert json.loads(bystander.recv(timeout=5)) == {"type": "pong"}


def test_report_and_bystander_intact(gateway: GatewayProcess, bystander: ClientConnection) -> None:
    """After the fuzzing, the bystander's state is untouched; the count of inputs is kept."""
    bystander.send(json.dumps({"type": "turn", "turn_id": "b2", "form": {"after": True}}))
    assert json.loads(bystander.recv(timeout=5)) == {"type": "ack", "turn_id": "b2", "version": 2}
    checker = {"user_id": "checker", "call_id": "c"}
    with connect(f"ws://127.0.0.1:{gateway.port}/ws") as ws:
        ws.send(
            json.dumps(
                {"type": "hello", "caller": checker, "tenant": "acme", "token": token(checker)}
            )
        )
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
    assert TRIED["examples"] >= min(EXAMPLES, 100)
    assert TRIED["welcomed"] > 0 and TRIED["acked"] > 0  # the fuzz got past hello
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz.json").write_text(json.dumps(TRIED) + "\n")
    print(
        f"fuzz: {TRIED['examples']} examples, {TRIED['frames']} frames,"
        f" {TRIED['welcomed']} welcomes, {TRIED['acked']} acks"
    )
