"""A client's whole text frame parsed at once, or left to websockets' parser untouched.

:func:`gateway.transport.websocket.whole_text_frame` must give exactly what websockets'
own parser would give, or nothing: each case is checked against a real websockets
protocol fed the same bytes.
"""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets import frames
from websockets.frames import Frame, Opcode
from websockets.protocol import Protocol, Side, State

from gateway.server import Gateway
from gateway.transport import websocket
from gateway.transport.websocket import whole_text_frame
from tests.support.wsclient import connect, hello, recv, url

PHONE = {"phone": "+14155550100", "call_id": "call-1"}


def server(max_size: int | None = 2**20) -> Protocol:
    """websockets' server side of an open connection, its parser at a frame boundary."""
    return Protocol(Side.SERVER, state=State.OPEN, max_size=max_size)


def wire(text: str | bytes, *, fin: bool = True, opcode: Opcode = Opcode.TEXT) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return Frame(opcode, data, fin=fin).serialize(mask=True)


def parsed(protocol: Protocol, data: bytes) -> list[Frame]:
    protocol.receive_data(data)
    return [event for event in protocol.events_received() if isinstance(event, Frame)]


@pytest.mark.parametrize("text", ["", "a", '{"type":"turn"}', "é" * 62, "x" * 125, "y" * 126])
def test_a_whole_text_frame_is_what_websockets_parses(text: str) -> None:
    """Lengths in 7 and in 16 bits, UTF-8 included: the same text as websockets'."""
    data = wire(text)
    assert whole_text_frame(server(), data) == text
    (frame,) = parsed(server(), data)
    assert bytes(frame.data).decode() == text


@pytest.mark.parametrize(
    "data",
    [
        wire("a", fin=False),  # fragmented
        wire(b"a", opcode=Opcode.BINARY),
        wire(b"", opcode=Opcode.PING),
        Frame(Opcode.TEXT, b"abc").serialize(mask=False),  # a client must mask
        wire("z" * 70_000),  # a 64-bit length
        wire("a") + wire("b"),  # two frames
        wire("abc")[:-1],  # part of one
        wire(b"\xff\xfe"),  # not UTF-8
    ],
)
def test_anything_else_is_left_to_websockets(data: bytes) -> None:
    assert whole_text_frame(server(), data) is None


def test_a_frame_past_max_size_is_left_to_websockets() -> None:
    """websockets refuses it with 1009; it must see it to do so."""
    assert whole_text_frame(server(max_size=10), wire("x" * 11)) is None
    assert whole_text_frame(server(max_size=10), wire("x" * 10)) == "x" * 10


def test_a_frame_past_max_fragment_size_is_left_to_websockets() -> None:
    protocol = Protocol(Side.SERVER, state=State.OPEN, max_size=(2**17, 10))
    assert whole_text_frame(protocol, wire("x" * 11)) is None
    assert whole_text_frame(protocol, wire("x" * 10)) == "x" * 10


@pytest.mark.parametrize("opcode", [Opcode.TEXT, Opcode.BINARY])
def test_a_whole_frame_inside_a_fragmented_message_is_left_to_websockets(
    opcode: Opcode,
) -> None:
    """A new message while one is under way breaks the protocol: websockets fails the
    connection (1002), so it must see the frame; taken here, it would be acted on out
    of order, ahead of the message begun before it."""
    protocol = server()
    (first,) = parsed(protocol, wire(b"{", fin=False, opcode=opcode))
    assert not first.fin and not protocol.reader.buffer
    data = wire('{"type":"turn","turn_id":"t2"}')
    assert whole_text_frame(protocol, data) is None
    assert parsed(protocol, data) == []
    assert protocol.state is State.CLOSING and protocol.close_sent is not None
    assert protocol.close_sent.code == 1002


def test_frames_are_unmasked_as_websockets_unmasks_them() -> None:
    """With websockets' C extension when it has one, as its parser does: its pure-Python
    fallback costs six times as much."""
    assert vars(websocket)["apply_mask"] is vars(frames)["apply_mask"]


def test_nothing_is_taken_unless_the_connection_is_open() -> None:
    protocol = server()
    protocol.state = State.CLOSING
    assert whole_text_frame(protocol, wire("a")) is None


def test_the_rest_of_a_frame_begun_is_never_taken_for_a_frame() -> None:
    """The parser took a frame's first two bytes and waits for the rest, with nothing
    buffered. The rest can look like a whole frame of its own (here its mask key does):
    it must go to websockets, which finishes the frame it began."""
    text = '{"type":"turn","turn_id":"t1"}'
    payload = text.encode()
    key = bytes([0x81, 0x80 | (len(payload) - 2), 0, 0])
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    data = bytes([0x81, 0x80 | len(payload)]) + key + masked
    rest = data[2:]
    assert whole_text_frame(server(), rest) is not None  # at a boundary, it would be taken
    protocol = server()
    assert parsed(protocol, data[:2]) == [] and not protocol.reader.buffer
    assert whole_text_frame(protocol, rest) is None
    (frame,) = parsed(protocol, rest)
    assert bytes(frame.data).decode() == text


async def test_a_turn_split_across_reads_is_answered(gateway: Gateway) -> None:
    """A turn whose frame arrives in pieces (its header first) goes through websockets'
    parser, and is answered as any other."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, PHONE)
        data = wire(json.dumps({"type": "turn", "turn_id": "t1", "form": {"a": 1}}))
        for piece in (data[:2], data[2:]):
            ws.transport.write(piece)
            await asyncio.sleep(0.05)
        ack = await recv(ws)
        assert (ack["type"], ack["turn_id"], ack["version"]) == ("ack", "t1", 1)
        (conn,) = gateway.sessions.connections
        parses: list[bytes | bytearray] = []
        receive = conn.ws.protocol.receive_data

        def counted(data: bytes | bytearray) -> None:
            parses.append(data)
            receive(data)

        conn.ws.protocol.receive_data = counted  # type: ignore[method-assign]
        ws.transport.write(wire(json.dumps({"type": "turn", "turn_id": "t2", "form": {"b": 2}})))
        ack = await recv(ws)
        assert (ack["turn_id"], ack["version"]) == ("t2", 2)
        assert parses == []  # whole: websockets' parser never saw it
