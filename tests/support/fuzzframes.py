"""Hypothesis strategies for the fuzz tests: frames a v1 client, Twilio and a voice agent
might send, each drawn as a small descriptor and rendered to its text only when sent.

Hypothesis prints (and, every so often, measures) the repr of what it draws; a drawn
70,000-character string makes it warn ("Generating overly large repr"), which the suite
turns into an error. So nothing drawn here is large: a huge string is :class:`Huge`, a deep
array :class:`Deep`, a frame of an exact size :class:`Sized`, a number no JSON encoder
writes :class:`Raw`, and :func:`render` expands them. :class:`Key` stands for the drawing
example's own marker, so that a frame can be traced to the session it was meant for.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

from hypothesis import strategies as st

from tests.support.authkeys import token

__all__ = [
    "AGENT_BURSTS",
    "BYSTANDER",
    "FUZZER",
    "GOOD_TURN",
    "GOOD_TWILIO",
    "MARKER",
    "MESSAGES",
    "PASSED",
    "SCALARS",
    "TWILIO_FRAMES",
    "V1_FRAMES",
    "Close",
    "Cut",
    "Deep",
    "Huge",
    "Key",
    "Raw",
    "Sized",
    "good_start",
    "marker",
    "render",
    "single",
    "wire",
]

MARKER = re.compile(r"fzk\d+x")
"""An example's marker (:func:`marker`): one example's data found in another's output is
a leak."""


def marker(n: int) -> str:
    """The marker of example ``n``: a call ID, and a tag in the data meant for its session."""
    return f"fzk{n}x"


@dataclass(frozen=True, slots=True)
class Raw:
    """JSON text put in as it is: an out-of-range number, ``NaN``, or junk."""

    text: str


@dataclass(frozen=True, slots=True)
class Huge:
    """A string of ``size`` times ``char`` (one to four UTF-8 bytes each)."""

    size: int
    char: str = "x"


@dataclass(frozen=True, slots=True)
class Deep:
    """Arrays (``[``) or objects (``{``) nested ``depth`` levels."""

    depth: int
    kind: str = "["


@dataclass(frozen=True, slots=True)
class Cut:
    """``value`` rendered, then cut after ``at`` characters (modulo its length): bad JSON."""

    value: Any
    at: int


@dataclass(frozen=True, slots=True)
class Sized:
    """``head`` (an object) padded to exactly ``size`` UTF-8 bytes, with a field or with
    whitespace."""

    size: int
    head: dict[str, Any]
    space: bool = False


@dataclass(frozen=True, slots=True)
class Key:
    """The example's marker, plus ``suffix``, as a JSON string."""

    suffix: str = ""


@dataclass(frozen=True, slots=True)
class Close:
    """Not a frame: the agent closes its connection with ``code`` at this point."""

    code: int


def _text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def render(value: Any, key: str = "") -> str:
    """JSON text for ``value``, with every descriptor in it expanded."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, Huge):
        return _text(value.char * value.size)
    if isinstance(value, Deep):
        close = "]" if value.kind == "[" else "}"
        opening = "[" if value.kind == "[" else '{"a":'
        middle = "" if value.kind == "[" else "0"
        return opening * value.depth + middle + close * value.depth
    if isinstance(value, Key):
        return _text(key + value.suffix)
    if isinstance(value, Cut):
        text = render(value.value, key)
        return text[: value.at % (len(text) + 1)]
    if isinstance(value, Sized):
        head = render(value.head, key)[:-1]
        rest = len(head.encode()) + (1 if value.space else len(',"pad":""}'))
        pad = max(0, value.size - rest)
        return head + (" " * pad + "}" if value.space else ',"pad":"' + "x" * pad + '"}')
    if isinstance(value, dict):
        return "{" + ",".join(f"{_text(str(k))}:{render(v, key)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(render(v, key) for v in value) + "]"
    return json.dumps(value, ensure_ascii=False)  # floats: inf and nan become Infinity, NaN


def wire(frame: Any, key: str = "") -> str | bytes:
    """The frame to send for a drawn ``frame``: bytes go as a binary frame."""
    return frame if isinstance(frame, bytes) else render(frame, key)


def single(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` as one branch of a ``one_of``, which would otherwise weigh each of its
    own branches as much as each other choice."""

    @st.composite
    def draw_one(draw: st.DrawFn) -> Any:
        return draw(strategy)

    return draw_one()


# The vocabulary: values every field may get, besides the protocol's own.

LITERALS = [
    "NaN",
    "-Infinity",
    "1e400",
    "-1e400",
    "1e-400",
    "-0",
    "4611686018427387904",  # 2^62
    "9007199254740992",  # 2^53
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775809",
    "18446744073709551616",
    "1" + "0" * 400,
    "0x10",
    "01",
    ".5",
    "+1",
    "tru",
    '"\\ud800"',
    '"\\u0000"',
]
STRINGS = [
    "NaN",
    "Infinity",
    "-Infinity",
    "nan",
    "inf",
    "1e400",
    "-0",
    "4611686018427387904",
    "9" * 30,
    "",
    " ",
    "\x00",
    "\u202e",
    "\U0001f600",
    "null",
    "0" * 300,
]
SIZES = [200, 4096, 65_000, 65_537, 131_073, 200_000]
"""Lengths of huge strings, around the default 64 KiB frame limit and its double."""
DEPTHS = [31, 32, 33, 64, 254, 255, 256, 300, 1023, 1025, 5000]
"""Nesting depths, around the codec's bound (32), orjson's writer (255) and reader (1024)."""
FRAME_SIZES = [65_535, 65_536, 65_537, 131_072, 131_073]
"""Frame sizes around the default 64 KiB limit and its double."""


def sized(*heads: dict[str, Any]) -> st.SearchStrategy[Sized]:
    """One of ``heads`` padded to one of :data:`FRAME_SIZES`, with a field or whitespace."""
    return st.builds(Sized, st.sampled_from(FRAME_SIZES), st.sampled_from(heads), st.booleans())


# One branch of SCALARS, not three: a huge or deep value in every third leaf would make
# most frames oversized.
SPECIAL = single(
    st.one_of(
        st.builds(Raw, st.sampled_from(LITERALS)),
        st.builds(Huge, st.sampled_from(SIZES), st.sampled_from(["x", "é", "\U0001f600"])),
        st.builds(Deep, st.sampled_from(DEPTHS), st.sampled_from(["[", "{"])),
    )
)
PHONES = ["+14155550100", "+1 415 555 0199", "4155550100", "+4930123456", "+999", "0" * 300]
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(),
    st.text(max_size=40),
    st.sampled_from([*PHONES, "bystander", "fuzz", "acme", *STRINGS]),
    SPECIAL,
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
OBJECTS = st.dictionaries(st.text(max_size=10), JSON, max_size=4)
JUNK = st.one_of(
    st.binary(max_size=64),
    st.builds(Raw, st.text(max_size=64)),
    st.builds(Raw, st.just("\ud800".encode("utf-8", "surrogatepass").decode("latin-1"))),
    JSON,
)


# Protocol v1, from a client.

BYSTANDER = {"user_id": "bystander", "call_id": "fuzz"}
FUZZER = {"user_id": "fuzzer", "call_id": "fuzz"}
TYPES = st.sampled_from(["hello", "turn", "ack", "bye", "ping", "welcome", "", "HELLO", None])
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
            "last_seq": st.one_of(SCALARS, st.integers(2**53 - 2, 2**64)),
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
V1_FRAMES = st.one_of(
    MESSAGES,
    # Mutations of valid frames: cut, deep, binary, sized at the limit, junk.
    st.builds(Cut, MESSAGES, st.integers(0, 400)),
    st.builds(
        lambda deep, field: {"type": "turn", "turn_id": "d", field: {"a": deep}},
        st.builds(Deep, st.sampled_from(DEPTHS), st.sampled_from(["[", "{"])),
        st.sampled_from(["form", "context"]),
    ),
    sized({"type": "hello"}, {"type": "turn", "turn_id": "sized"}),
    JUNK,
)
GOOD_TURN = st.builds(
    lambda turn_id, form: {"type": "turn", "turn_id": turn_id, "form": form},
    st.text(min_size=1, max_size=8),
    st.dictionaries(st.text(max_size=8), SCALARS, max_size=3),
)


# Twilio Media Streams, from Twilio (or whoever opens /v1/twilio).

NUMBERS = st.one_of(
    st.integers(0, 10**6).map(str),
    st.sampled_from(["", "-1", "1e3", "99999999999999999999", "\u0661\u0662", "0" * 19, " 1"]),
    SCALARS,
)
SIDS = st.one_of(st.text(max_size=12), SCALARS)
"""Call and stream IDs: never the example's marker, which only :func:`good_start` puts in
both, as Twilio would (the agent checks that a link carries no other example's marker)."""
AUDIO = st.binary(min_size=1, max_size=160).map(lambda b: base64.b64encode(b).decode())
PAYLOADS = st.one_of(AUDIO, SCALARS)
PARAMS = st.fixed_dictionaries(
    {
        # Never the bystander: without a Twilio auth token, a stream may name any caller key
        # and take its session over, as documented (docs/twilio.md, Signature).
        "From": st.one_of(
            st.sampled_from([*PHONES, "client:alice", "anonymous", ""]), SCALARS
        ).filter(lambda who: who != BYSTANDER["user_id"])
    },
    optional={"tenant": st.one_of(st.just("acme"), SCALARS), "extra": JSON},
)
START = st.fixed_dictionaries(
    {"callSid": SIDS, "streamSid": SIDS, "customParameters": st.one_of(PARAMS, JSON)},
    optional={
        "accountSid": SIDS,
        "tracks": st.one_of(st.just(["inbound"]), JSON),
        "mediaFormat": st.one_of(
            st.just({"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}),
            st.fixed_dictionaries({"encoding": SCALARS, "sampleRate": SCALARS}),
            JSON,
        ),
    },
)
_SEQUENCED = {"sequenceNumber": NUMBERS, "streamSid": SIDS}
MEDIA = st.fixed_dictionaries(
    {
        "event": st.just("media"),
        "media": st.one_of(
            st.fixed_dictionaries(
                {
                    "track": st.one_of(st.sampled_from(["inbound", "outbound"]), SCALARS),
                    "chunk": NUMBERS,
                    "timestamp": NUMBERS,
                    "payload": PAYLOADS,
                }
            ),
            JSON,
        ),
    },
    optional=_SEQUENCED,
)
DTMF = st.fixed_dictionaries(
    {
        "event": st.just("dtmf"),
        "sequenceNumber": NUMBERS,
        "dtmf": st.one_of(
            st.fixed_dictionaries(
                {"digit": st.one_of(st.sampled_from(list("0123456789*#")), SCALARS)},
                optional={"track": SCALARS},
            ),
            JSON,
        ),
    },
    optional={"streamSid": SIDS},
)
MARK = st.fixed_dictionaries(
    {
        "event": st.just("mark"),
        "mark": st.one_of(st.fixed_dictionaries({"name": st.one_of(st.text(), SCALARS)}), JSON),
    },
    optional=_SEQUENCED,
)
TWILIO_FRAMES = st.one_of(
    st.fixed_dictionaries(
        {"event": st.just("connected")}, optional={"protocol": SCALARS, "version": SCALARS}
    ),
    st.fixed_dictionaries(
        {"event": st.just("start"), "start": st.one_of(START, JSON)}, optional=_SEQUENCED
    ),
    MEDIA,
    DTMF,
    MARK,
    st.fixed_dictionaries({"event": st.just("stop")}, optional={"stop": JSON, **_SEQUENCED}),
    st.fixed_dictionaries(
        {"event": st.one_of(st.sampled_from(["", "START", "clear", "closed", "Media"]), SCALARS)},
        optional={"media": JSON, "start": JSON},
    ),
    st.builds(Cut, st.one_of(MEDIA, DTMF, MARK), st.integers(0, 200)),
    sized({"event": "media"}, {"event": "connected"}),
    JUNK,
)


GOOD_TWILIO = st.one_of(
    st.builds(
        lambda payload, chunk: {
            "event": "media",
            "media": {
                "track": "inbound",
                "chunk": str(chunk),
                "timestamp": str(chunk * 20),
                "payload": payload,
            },
        },
        AUDIO,
        st.integers(1, 10**5),
    ),
    st.builds(
        lambda digit, n: {
            "event": "dtmf",
            "sequenceNumber": str(n),
            "dtmf": {"track": "inbound_track", "digit": digit},
        },
        st.sampled_from(list("0123456789*#")),
        st.integers(1, 10**6),
    ),
    st.builds(
        lambda name: {"event": "mark", "mark": {"name": name}}, st.text(min_size=1, max_size=20)
    ),
)
"""What Twilio sends in the middle of a call: audio, a key press, a mark played."""


def good_start(stream: str, caller: str, passed: dict[str, Any] | None = None) -> dict[str, Any]:
    """A valid ``start`` for the example's call (its marker is the ``callSid``).

    Args:
        passed: Fields that the gateway passes on to the agent as they are, to put in place
            of Twilio's: ``accountSid``, ``tracks``, ``mediaFormat``, and ``extra``, added
            to ``customParameters``.
    """
    passed = dict(passed or {})
    params = {"From": caller, "tenant": "acme"}
    if "extra" in passed:
        params["extra"] = passed.pop("extra")
    return {
        "event": "start",
        "sequenceNumber": "1",
        "start": {
            "accountSid": "AC" + "0" * 32,
            "callSid": Key(),
            "streamSid": Key(stream),
            "tracks": ["inbound"],
            "customParameters": params,
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
            **passed,
        },
        "streamSid": Key(stream),
    }


PASSED = st.fixed_dictionaries(
    {},
    optional={
        "accountSid": JSON,
        "tracks": JSON,
        "mediaFormat": JSON,
        "extra": JSON,
    },
)
"""Values for a valid ``start``'s pass-through fields (see :func:`good_start`)."""


# The voice agent's answers.

AGENT_TYPES = st.one_of(
    st.sampled_from(
        ["say", "msg", "welcome", "error", "ack", "session.start", "turn", "STATE", " state", ""]
    ),
    st.text(max_size=10),
)
CHANGES = st.one_of(
    st.dictionaries(st.text(max_size=10), st.one_of(SCALARS, st.none()), max_size=4),
    OBJECTS,
    SCALARS,
)
PATCHES = st.one_of(
    st.fixed_dictionaries({}, optional={"form_answers": CHANGES, "context": CHANGES}),
    st.dictionaries(st.sampled_from(["form_answers", "context", "last_turn", "version"]), JSON),
    JSON,
)
AGENT_FRAMES = st.one_of(
    st.fixed_dictionaries({"type": st.just("state"), "patch": PATCHES}),
    st.fixed_dictionaries(
        {"type": AGENT_TYPES},
        optional={"text": SCALARS, "data": JSON, "seq": SCALARS, "session_id": SCALARS},
    ),
    st.fixed_dictionaries({"type": st.just("media"), "payload": PAYLOADS}),
    st.fixed_dictionaries({"type": st.just("mark"), "name": st.one_of(st.text(), SCALARS)}),
    st.just({"type": "clear"}),
    st.builds(
        Cut, st.fixed_dictionaries({"type": AGENT_TYPES, "text": SCALARS}), st.integers(0, 400)
    ),
    sized({"type": "say"}, {"type": "media", "payload": "AAAA"}),
    JUNK,
)
AGENT_BURSTS = st.lists(
    st.builds(
        lambda frames, close: [*frames, Close(close)] if close else frames,
        st.lists(AGENT_FRAMES, max_size=10),
        # Now and then the agent hangs up after its frames: the gateway redials it.
        st.sampled_from([0] * 12 + [1000, 1001, 1011, 4000]),
    ),
    min_size=1,
    max_size=3,
)
"""What the agent sends on each ``session.start`` or ``session.resume`` of one session, in
turn; a :class:`Close` ends a burst by hanging up."""
