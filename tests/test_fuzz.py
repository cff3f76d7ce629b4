"""Hypothesis throws random and mutated frames at a live gateway process: protocol v1 frames
from clients, Twilio Media Streams frames, and a voice agent's answers. The gateway must
never crash, log a traceback or an error, answer with an undocumented error or close code,
show one caller another's data, or change a bystander session, which keeps being served
beside the fuzzed ones.

The agent is :class:`tests.support.fuzzagent.FuzzAgent`, in this process: each agent example draws
the frames it answers its session with. Every drawn value is small (:mod:`tests.support.fuzzframes`
expands huge and deep values only when a frame is sent), so the number of examples is
bounded by time alone: ``HANGON_FUZZ_EXAMPLES`` (default 500, about 40 s) examples of each
kind, v1, Twilio and agent. 6,000 of each send some 130,000 frames in about 8 minutes::

    HANGON_FUZZ_EXAMPLES=6000 .venv/bin/python -m pytest tests/test_fuzz.py \\
        -p no:cacheprovider -o timeout=0 -s

(``-o timeout=0``: the per-test timeout is for CI). ``HANGON_FUZZ_STORE=redis`` fuzzes a
gateway on the suite's Redis instead of the memory store. The counts are printed and
written to ``test-artifacts/fuzz.json``.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from gateway.core.protocol import ERRORS
from tests.support.authkeys import keys_document, token
from tests.support.fuzzagent import FuzzAgent
from tests.support.fuzzframes import (
    AGENT_BURSTS,
    BYSTANDER,
    FUZZER,
    GOOD_TURN,
    GOOD_TWILIO,
    MARKER,
    PASSED,
    SCALARS,
    TWILIO_FRAMES,
    V1_FRAMES,
    good_start,
    marker,
    single,
    wire,
)
from tests.support.gateway_process import GatewayProcess

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
SECRET = "Bystander-Secret-4155550123"
EXAMPLES = int(os.environ.get("HANGON_FUZZ_EXAMPLES", "500"))
STORE = os.environ.get("HANGON_FUZZ_STORE", "memory")
MAX_MESSAGE = 65536
"""The gateway's ``--max-message-size`` (its default)."""
UNEXPECTED = {"internal_error", "store_unavailable"}
"""Errors no input may cause: the gateway's own failure, and the store's, which is healthy
throughout (a script that fails on an argument it did not check says store_unavailable)."""
CLOSE_CODES = {reason.code for code, reason in ERRORS.items() if code not in UNEXPECTED} | {
    1000,
    1009,
}
"""Every close a fuzzed peer may get: the documented ones, not 1011 (an internal error or a
missed pong, neither of which a client that answers pings should see) nor 4001."""
ANSWER_TIMEOUT = 10.0
"""Seconds within which the gateway must answer the last frame of an example."""
BAD_LOG = re.compile(
    r"Traceback|Task exception was never retrieved|unexpected error|^\S+ \S+ (?:ERROR|CRITICAL) ",
    re.MULTILINE,
)

TRIED: dict[str, Any] = {
    "examples": Counter(),
    "frames": Counter(),
    "welcomes": 0,
    "acks": 0,
    "msgs": 0,
    "twilio_out": 0,
    "degraded": 0,
    "started": time.monotonic(),
}
CONTEXT: list[Callable[[], str]] = []
"""What to add to a failure's message: the log's tail, the agent's trace."""


def context() -> str:
    return "".join(f"\n{part()}" for part in CONTEXT)


def log_tail(path: Path, size: int = 6000) -> str:
    with path.open("rb") as f:
        f.seek(max(0, path.stat().st_size - size))
        return "the gateway's log ends:\n" + f.read().decode(errors="replace")


RECENT: deque[str] = deque(maxlen=12)
"""The last examples, for a failure that shows up in the log after its example ended."""
NUMBERS = itertools.count(1)
PING = json.dumps({"type": "ping"})


# The gateway, its agent, and the bystander


@pytest.fixture(scope="module")
def agent() -> Iterator[FuzzAgent]:
    with FuzzAgent(secret=SECRET, owner=BYSTANDER) as fuzz_agent:
        yield fuzz_agent


class Log:
    """The gateway's log, read as it grows."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def check(self) -> None:
        """Fail if what was logged since the last check has a traceback or an error."""
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        data = data[: data.rfind(b"\n") + 1]  # whole lines: a word cut in two is not missed
        self.offset += len(data)
        text = data.decode(errors="replace")
        found = BAD_LOG.search(text)
        if found:
            start = text.rfind("\n", 0, max(0, found.start() - 2000)) + 1
            recent = "\n".join(RECENT)
            raise AssertionError(
                f"the gateway logged:\n{text[start : found.end() + 3000]}\n"
                f"during or after these examples, newest last:\n{recent}"
            )


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, agent: FuzzAgent, request: pytest.FixtureRequest
) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("fuzz")
    log, keys = workdir / "gateway.log", workdir / "keys.json"
    keys.write_text(keys_document())
    store: list[str] = []
    prefix = f"fuzz-{uuid.uuid4().hex[:12]}:"
    if STORE == "redis":
        store = ["--redis-url", request.getfixturevalue("redis_url"), "--key-prefix", prefix]
    gw = GatewayProcess(
        log,
        *("--downstream", agent.url, "--auth-keys", str(keys), "--max-turns-per-second", "none"),
        # A dropped client's agent link lingers a while: short, so that links do not pile up.
        *("--agent-linger", "2", "--agent-retry-max-delay", "0.5", "--drain-period", "0"),
        *store,
    )
    gw.start()
    TRIED["started"] = time.monotonic()
    CONTEXT[:] = [lambda: log_tail(log)]
    yield gw
    assert gw.proc is not None and gw.proc.poll() is None, "the gateway died"
    gw.terminate()
    Log(log).check()
    if STORE == "redis":
        client = redis.Redis.from_url(request.getfixturevalue("redis_url"))
        keys_left = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys_left:
            client.delete(*keys_left)
        client.close()


@pytest.fixture(scope="module")
def gateway_log(gateway: GatewayProcess) -> Log:
    return Log(gateway.log_path)


def hello(caller: dict[str, Any], **fields: Any) -> str:
    return json.dumps(
        {"type": "hello", "caller": caller, "tenant": "acme", "token": token(caller), **fields}
    )


@pytest.fixture(scope="module")
def bystander(gateway: GatewayProcess) -> Iterator[tuple[ClientConnection, dict[str, Any]]]:
    """The bystander's connection, and its welcome once its secret is stored."""
    url = f"ws://127.0.0.1:{gateway.port}/ws"
    with connect(url, ping_interval=None) as ws:
        ws.send(hello(BYSTANDER))
        assert json.loads(ws.recv(timeout=5))["type"] == "welcome"
        ws.send(json.dumps({"type": "turn", "turn_id": "b1", "form": {"secret": SECRET}}))
        assert json.loads(ws.recv(timeout=5))["version"] == 1
    # Taken again, so that its state is known from a welcome.
    with connect(url, ping_interval=None) as ws:
        ws.send(hello(BYSTANDER))
        welcome = json.loads(ws.recv(timeout=5))
        assert welcome["version"] == 1 and welcome["state"]["form_answers"] == {"secret": SECRET}
        yield ws, welcome


@dataclass(frozen=True, slots=True)
class Target:
    """What every example works on: the gateway, its log, its agent and the bystander."""

    gateway: GatewayProcess
    log: Log
    agent: FuzzAgent
    bystander: tuple[ClientConnection, dict[str, Any]]
    """The bystander's connection, and its welcome once its secret was stored."""

    def after_example(self) -> None:
        """The gateway lives, logged nothing bad, and serves the bystander, which gets
        nothing but the pong it asked for; the agent saw nothing amiss."""
        proc = self.gateway.proc
        assert proc is not None and proc.poll() is None, "the gateway died"
        self.log.check()
        violations = self.agent.take_violations()
        assert not violations, violations
        ws = self.bystander[0]
        ws.send(PING)
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong"}


@pytest.fixture(scope="module")
def target(
    gateway: GatewayProcess,
    gateway_log: Log,
    agent: FuzzAgent,
    bystander: tuple[ClientConnection, dict[str, Any]],
) -> Target:
    return Target(gateway, gateway_log, agent, bystander)


# One connection of a fuzzed client


def converse(
    url: str,
    frames: list[str | bytes],
    done: Callable[[dict[str, Any]], bool],
    *,
    again: bool = False,
) -> tuple[list[str], int | None]:
    """Send ``frames`` on a fresh connection, then read until ``done`` says the answer to the
    last one came or the gateway closes; return what came and the close code, if any.

    ``again``: send the last frame again every 0.2 s until then (a mark, which the gateway
    drops if the agent link drops at the wrong moment).
    """
    got: list[str] = []
    try:
        # A short close timeout, and the gateway's close seen as it comes rather than when
        # the TCP connection ends: a server that stopped reading (websockets pauses once
        # max_queue frames wait) completes no closing handshake before its close_timeout.
        with connect(
            url,
            max_size=None,
            open_timeout=5,
            close_timeout=0.02,
            compression=None,
            # websockets' pings draw from the random module, from a thread of their own:
            # hypothesis takes that for a strategy that uses it. The gateway pings anyway.
            ping_interval=None,
        ) as ws:
            try:
                for frame in frames:
                    ws.send(frame)
                deadline = sent = time.monotonic()
                deadline += ANSWER_TIMEOUT
                while True:
                    now = time.monotonic()
                    assert now < deadline, (
                        f"no answer in {ANSWER_TIMEOUT} s: {got[-5:]}" + context()
                    )
                    if again and now - sent > 0.2:
                        ws.send(frames[-1])
                        sent = now
                    try:
                        answer = ws.recv(timeout=0.01)
                    except TimeoutError:
                        closed = ws.protocol.close_rcvd
                        if closed is not None:
                            return got, closed.code
                        continue
                    assert isinstance(answer, str), f"a binary frame: {answer[:100]!r}"
                    got.append(answer)
                    if done(json.loads(answer)):
                        return got, None
            except ConnectionClosed as exc:
                return got, exc.rcvd.code if exc.rcvd is not None else 1006
    except InvalidStatus as exc:  # refused upgrade: only a 503 under load is expected
        assert exc.response.status_code == 503
        return got, None


def check_answers(got: list[str], code: int | None, key: str | None) -> list[dict[str, Any]]:
    """Each answer is a JSON object that carries neither the bystander's secret nor another
    example's marker; the close code is documented."""
    assert code in CLOSE_CODES or code is None, f"close code {code} after {got[-3:]}"
    frames = []
    for answer in got:
        assert SECRET not in answer
        assert all(found == key for found in MARKER.findall(answer)), (key, answer[:300])
        frame = json.loads(answer)
        assert isinstance(frame, dict)
        frames.append(frame)
    return frames


def check_v1(got: list[str], code: int | None, key: str | None) -> list[dict[str, Any]]:
    frames = check_answers(got, code, key)
    for frame in frames:
        kind = frame.get("type")
        TRIED["welcomes"] += kind == "welcome"
        TRIED["acks"] += kind == "ack"
        TRIED["msgs"] += kind == "msg"
        TRIED["degraded"] += kind == "welcome" and frame.get("degraded", False)
        if kind == "error":
            assert frame["code"] in ERRORS and frame["code"] not in UNEXPECTED, frame
        assert kind != "nack", frame  # a turn the healthy store did not take
    return frames


def check_twilio(
    got: list[str], code: int | None, key: str | None, sent: list[str | bytes]
) -> None:
    """Twilio hears only media, marks and clears, each for a stream it started."""
    streams = set()
    for frame in sent:
        try:
            start = orjson.loads(frame)["start"]["streamSid"]
        except (ValueError, KeyError, TypeError):  # orjson.JSONDecodeError is a ValueError
            continue
        streams.add(start if isinstance(start, str) else None)
    for frame in check_answers(got, code, key):
        assert frame.get("event") in ("media", "mark", "clear"), frame
        assert frame.get("streamSid") in streams, (frame, streams)
        TRIED["twilio_out"] += 1


def pings(frames: list[str | bytes]) -> int:
    """How many of ``frames`` the gateway answers with a pong (while open)."""
    count = 0
    for frame in frames:
        if isinstance(frame, str) and len(frame.encode()) <= MAX_MESSAGE:
            try:
                message = orjson.loads(frame)
            except orjson.JSONDecodeError:
                continue
            count += isinstance(message, dict) and message.get("type") == "ping"
    return count


def until_pongs(expected: int) -> Callable[[dict[str, Any]], bool]:
    seen = 0

    def done(frame: dict[str, Any]) -> bool:
        nonlocal seen
        seen += frame.get("type") == "pong"
        return seen >= expected

    return done


def record(kind: str, drawn: object) -> None:
    TRIED["examples"][kind] += 1
    text = repr(drawn)
    RECENT.append(f"{kind}: {text[:2000]}{' ...' if len(text) > 2000 else ''}")


SETTINGS = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


# Protocol v1


GOOD_HELLO = st.builds(
    lambda resume: {
        "type": "hello",
        "caller": FUZZER,
        "tenant": "acme",
        "token": token(FUZZER),
        **resume,
    },
    # A resume of the fuzzer's one session, now and then with out-of-range values.
    st.fixed_dictionaries(
        {},
        optional={
            "last_seq": st.one_of(
                st.integers(0, 5), st.integers(2**53 - 2, 2**64), single(SCALARS)
            ),
            "resume_token": single(SCALARS),
        },
    ),
)


@SETTINGS
@given(
    frames=st.one_of(
        st.lists(V1_FRAMES, min_size=1, max_size=6),
        # A proper hello first, so that what follows is fuzzed inside an open session.
        st.tuples(GOOD_HELLO, st.lists(st.one_of(GOOD_TURN, single(V1_FRAMES)), max_size=6)).map(
            lambda t: [t[0], *t[1]]
        ),
    )
)
def test_fuzzed_v1_frames_harm_nobody(
    target: Target,
    frames: list[Any],
) -> None:
    """Whatever a client sends, each answer is a JSON frame or a documented close, none
    carries another caller's data, and the gateway answers the ping that follows."""
    record("v1", frames)
    sent = [wire(frame) for frame in frames]
    TRIED["frames"]["v1"] += len(sent) + 1
    got, code = converse(
        f"ws://127.0.0.1:{target.gateway.port}/ws", [*sent, PING], until_pongs(1 + pings(sent))
    )
    check_v1(got, code, None)
    target.after_example()


# Twilio Media Streams


def sync_mark(key: str, stream: int) -> str:
    name = f"fzsync-{key}-{stream}"
    return json.dumps({"event": "mark", "streamSid": f"{key}-s{stream}", "mark": {"name": name}})


def until_mark(name: str) -> Callable[[dict[str, Any]], bool]:
    return lambda frame: frame.get("event") == "mark" and frame.get("mark", {}).get("name") == name


def twilio_stream(port: int, sent: list[str | bytes], key: str, sync: str, stream: int) -> None:
    """Send ``sent`` on a new Twilio stream, then a mark named for ``sync`` and ``stream``
    until it comes back through the agent; check what Twilio heard meanwhile (``key``:
    the example's marker)."""
    TRIED["frames"]["twilio"] += len(sent) + 1
    got, code = converse(
        f"ws://127.0.0.1:{port}/v1/twilio",
        [*sent, sync_mark(sync, stream)],
        until_mark(f"fzsync-{sync}-{stream}"),
        again=True,
    )
    check_twilio(got, code, key, sent)


@SETTINGS
@given(
    frames=st.one_of(
        st.lists(TWILIO_FRAMES, min_size=1, max_size=8),
        # A proper start first, so that what follows is fuzzed inside an open call.
        st.tuples(
            st.sampled_from(["+14155550100", "+1 415 555 0199", "client:alice", "anonymous"]),
            st.one_of(st.none(), PASSED),
            st.lists(st.one_of(GOOD_TWILIO, single(TWILIO_FRAMES)), max_size=8),
        ).map(lambda t: [{"event": "connected"}, good_start("-s0", t[0], t[1]), *t[2]]),
    )
)
def test_fuzzed_twilio_frames_harm_nobody(
    target: Target,
    frames: list[Any],
) -> None:
    """Whatever arrives on a Twilio stream (no signature is asked for without a Twilio auth
    token), Twilio hears only its own stream's audio and marks, or a documented close, and
    a mark it sends last makes the round trip through the agent."""
    record("twilio", frames)
    number = next(NUMBERS)
    key = marker(number)
    sent = [wire(frame, key) for frame in frames]
    # The mark is named for the number, not the marker: a fuzzed start may name a call
    # that other examples' streams share.
    twilio_stream(target.gateway.port, sent, key, f"t{number}", 0)
    target.after_example()


# The voice agent

V1_TURNS = st.lists(st.one_of(GOOD_TURN, single(V1_FRAMES)), max_size=4)
TWILIO_MEDIA = st.tuples(
    st.one_of(st.none(), PASSED),
    st.lists(st.one_of(GOOD_TWILIO, single(TWILIO_FRAMES)), max_size=4),
)


def agent_v1(port: int, key: str, connections: list[list[Any]]) -> None:
    """The fuzzer's call ``key`` over one or more connections, each resuming the last."""
    caller = {"user_id": "fuzzer", "call_id": key}
    resume: dict[str, Any] = {}
    for number, turns in enumerate(connections):
        sync = f"fzsync-{key}-{number}"
        opening = json.dumps(
            {
                "type": "hello",
                "caller": caller,
                "tenant": "acme",
                "token": token({"user_id": "fuzzer"}),  # opens new calls; resumes with a token
                **resume,
            }
        )
        sent = [wire(turn, key) for turn in turns]
        TRIED["frames"]["v1"] += len(sent) + 2
        got, code = converse(
            f"ws://127.0.0.1:{port}/ws",
            [opening, *sent, json.dumps({"type": "turn", "turn_id": sync})],
            lambda f, sync=sync: f.get("type") == "msg" and f.get("data", {}).get("id") == sync,
        )
        for frame in check_v1(got, code, key):
            if frame.get("type") == "welcome":
                resume["resume_token"] = frame["resume_token"]
                resume["last_seq"] = frame["seq"]
            if frame.get("type") == "msg":
                resume["last_seq"] = frame["seq"]


def agent_twilio(port: int, key: str, connections: list[tuple[Any, list[Any]]]) -> None:
    """The call ``key`` over one or more streams, each a new stream of the same call."""
    for number, (passed, media) in enumerate(connections):
        start = good_start(f"-s{number}", "+14155550100", passed)
        sent = [wire(frame, key) for frame in [{"event": "connected"}, start, *media]]
        twilio_stream(port, sent, key, key, number)


@SETTINGS
@given(
    bursts=AGENT_BURSTS,
    client=st.one_of(
        st.tuples(st.just("v1"), st.lists(V1_TURNS, min_size=1, max_size=2)),
        st.tuples(st.just("twilio"), st.lists(TWILIO_MEDIA, min_size=1, max_size=2)),
    ),
)
def test_fuzzed_agent_frames_harm_nobody(
    target: Target,
    bursts: list[list[Any]],
    client: tuple[str, list[Any]],
) -> None:
    """Whatever the agent answers a session with (a burst on each session.start and
    session.resume: state patches, messages, audio, junk, huge or deep frames, a hang-up),
    its client gets only its own session's data, and the turn or mark it sends last makes
    the round trip through the agent."""
    record("agent", (bursts, client))
    key = marker(next(NUMBERS))
    target.agent.script(key, bursts)
    CONTEXT[1:] = [lambda: f"the agent's trace: {target.agent.trace(key)}"]
    try:
        kind, connections = client
        (agent_v1 if kind == "v1" else agent_twilio)(target.gateway.port, key, connections)
    finally:
        target.agent.forget(key)
    target.after_example()


def test_report_and_bystander_intact(
    target: Target,
) -> None:
    """After the fuzzing, the bystander's state is as it was and its session still takes
    turns; the counts are kept."""
    target.after_example()
    with connect(f"ws://127.0.0.1:{target.gateway.port}/ws") as ws:
        ws.send(hello(BYSTANDER))
        welcome = json.loads(ws.recv(timeout=5))
        before = target.bystander[1]
        assert (welcome["state"], welcome["version"], welcome["seq"]) == (
            before["state"],
            before["version"],
            before["seq"],
        )
        ws.send(json.dumps({"type": "turn", "turn_id": "b2", "form": {"after": True}}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "ack", "turn_id": "b2", "version": 2}
    examples, frames = TRIED["examples"], TRIED["frames"]
    frames["agent"] = target.agent.counts["sent"]
    report = {
        "examples": sum(examples.values()),
        "examples_by_kind": dict(examples),
        "frames": sum(frames.values()),
        "frames_by_kind": dict(frames),
        "welcomes": TRIED["welcomes"],
        "acks": TRIED["acks"],
        "msgs": TRIED["msgs"],
        "twilio_out": TRIED["twilio_out"],
        "degraded": TRIED["degraded"],
        "agent": dict(target.agent.counts),
        "store": STORE,
        "seconds": round(time.monotonic() - TRIED["started"]),
    }
    ARTIFACTS.mkdir(exist_ok=True)
    (ARTIFACTS / "fuzz.json").write_text(json.dumps(report) + "\n")
    print(f"fuzz: {json.dumps(report)}")
    assert sum(examples.values()) >= min(3 * EXAMPLES, 100)
    if EXAMPLES >= 100:  # the fuzz got past hello and start, and the agent was heard
        assert TRIED["welcomes"] > 0 and TRIED["acks"] > 0 and TRIED["msgs"] > 0
        assert TRIED["twilio_out"] > 0 and target.agent.counts["errors"] > 0
