"""A client's frames framed by the gateway, or left to websockets untouched.

:func:`gateway.transport.websocket.text_frames` must give exactly the bytes websockets
would write for the same frames, or nothing: each case is checked against a real
websockets protocol sending the same frames.
"""

from __future__ import annotations

import json
import logging

import pytest
from websockets.extensions.permessage_deflate import PerMessageDeflate
from websockets.protocol import Protocol, Side, State
from websockets.typing import BytesLike

from gateway.server import Gateway
from gateway.transport.websocket import text_frames
from tests.support.wsclient import connect, hello, recv, send, url

PHONE = {"phone": "+14155550100", "call_id": "call-1"}


def opened(side: Side = Side.SERVER, **kwargs: object) -> Protocol:
    return Protocol(side, state=State.OPEN, **kwargs)  # type: ignore[arg-type]


def websockets_writes(frames: list[bytes]) -> bytes:
    protocol = opened()
    for frame in frames:
        protocol.send_text(frame)
    return b"".join(protocol.data_to_send())


@pytest.mark.parametrize(
    "frames",
    [
        [b""],
        [b'{"type":"ack"}'],
        [b"x" * 125],
        [b"x" * 126],
        [b"y" * 65535],
        [b"z" * 65536],
        ["é".encode() * 70],
        [b'{"type":"ack"}', b"a" * 200, b"", b"b" * 70_000],
    ],
)
def test_the_bytes_are_those_websockets_writes(frames: list[bytes]) -> None:
    """Lengths in 7, 16 and 64 bits, one frame or several: byte for byte websockets'."""
    assert text_frames(opened(), frames) == websockets_writes(frames)


def test_a_client_side_is_left_to_websockets() -> None:
    """The agent link's frames must be masked: websockets masks them."""
    assert text_frames(opened(Side.CLIENT), [b"a"]) is None


def test_nothing_is_framed_unless_the_connection_is_open() -> None:
    for state in (State.CONNECTING, State.CLOSING, State.CLOSED):
        protocol = opened()
        protocol.state = state
        assert text_frames(protocol, [b"a"]) is None


def test_a_fragmented_message_being_sent_is_left_to_websockets() -> None:
    """websockets refuses a new message before the last fragment: it must see this one."""
    protocol = opened()
    protocol.send_text(b"part", fin=False)
    protocol.data_to_send()
    assert text_frames(protocol, [b"a"]) is None


def test_frames_queued_unwritten_go_first() -> None:
    """A frame websockets queued and has not written yet must not be overtaken."""
    protocol = opened()
    protocol.send_ping(b"")
    assert text_frames(protocol, [b"a"]) is None


def test_an_extension_is_left_to_websockets() -> None:
    protocol = opened()
    protocol.extensions = [PerMessageDeflate(False, False, 15, 15)]
    assert text_frames(protocol, [b"a"]) is None


def test_a_debug_log_of_each_frame_is_left_to_websockets() -> None:
    logger = logging.getLogger("tests.frames_written")
    logger.setLevel(logging.DEBUG)
    assert text_frames(opened(logger=logger), [b"a"]) is None


async def test_an_ack_is_framed_without_websockets(gateway: Gateway) -> None:
    """A turn's ack is written framed here, and the client's websockets reads it."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, PHONE)
        (conn,) = gateway.sessions.connections
        sent: list[BytesLike] = []
        send_text = conn.ws.protocol.send_text

        def counted(data: BytesLike, fin: bool = True) -> None:
            sent.append(data)
            send_text(data, fin)

        conn.ws.protocol.send_text = counted  # type: ignore[method-assign]
        await send(ws, {"type": "turn", "turn_id": "t1", "form": {"a": 1}})
        ack = await recv(ws)
        assert (ack["type"], ack["turn_id"], ack["version"]) == ("ack", "t1", 1)
        assert sent == []  # framed here: websockets' send_text never saw it
        conn.ws.protocol.debug = True
        try:
            await send(ws, {"type": "turn", "turn_id": "t2", "form": {"b": 2}})
            ack = await recv(ws)
        finally:
            conn.ws.protocol.debug = False
        assert (ack["turn_id"], ack["version"]) == ("t2", 2)
        assert [json.loads(bytes(data))["turn_id"] for data in sent] == ["t2"]  # websockets' path
