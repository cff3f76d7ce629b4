"""Small helpers over the real websockets client, for protocol v1."""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.uri import parse_uri

__all__ = ["Closed", "closed", "connect", "hello", "raw_client", "recv", "send", "turn", "url"]


def url(port: int, path: str = "/ws") -> str:
    return f"ws://127.0.0.1:{port}{path}"


async def raw_client(
    port: int, sock: socket.socket | None = None, *, path: str = "/ws"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, ClientProtocol]:
    """Send a WebSocket handshake on a connection of our own, which answers nothing by
    itself (websockets' protocol queues pongs; nobody sends them)."""
    if sock is None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    else:
        reader, writer = await asyncio.open_connection(sock=sock)
    protocol = ClientProtocol(parse_uri(url(port, path)), max_size=None)
    protocol.send_request(protocol.connect())
    writer.write(b"".join(protocol.data_to_send()))
    return reader, writer, protocol


async def send(ws: ClientConnection, message: dict[str, Any]) -> None:
    await ws.send(json.dumps(message))


async def recv(ws: ClientConnection, timeout: float = 5) -> dict[str, Any]:
    import asyncio

    frame = await asyncio.wait_for(ws.recv(), timeout)
    assert isinstance(frame, str), "the gateway sends text frames only"
    message: dict[str, Any] = json.loads(frame)
    return message


async def hello(ws: ClientConnection, caller: dict[str, Any], **fields: Any) -> dict[str, Any]:
    await send(ws, {"type": "hello", "caller": caller, **fields})
    return await recv(ws)


async def turn(ws: ClientConnection, turn_id: str, **fields: Any) -> dict[str, Any]:
    await send(ws, {"type": "turn", "turn_id": turn_id, **fields})
    return await recv(ws)


class Closed:
    """The error frame (if any) and close code that ended a connection."""

    def __init__(self, error: dict[str, Any] | None, code: int | None, reason: str) -> None:
        self.error = error
        self.code = code
        self.reason = reason

    def expect(
        self, close_code: int, code: str, *, reconnect: bool | None = None
    ) -> dict[str, Any]:
        """Check that the gateway closed with ``close_code`` after an error frame with
        ``code`` (and ``reconnect``, when given); return that frame."""
        assert self.code == close_code, (self.code, self.error)
        assert self.error is not None and self.error["code"] == code, self.error
        if reconnect is not None:
            assert self.error["reconnect"] is reconnect, self.error
        return self.error


async def closed(ws: ClientConnection, timeout: float = 5) -> Closed:
    """Read until the gateway closes; return the last error frame and the close code."""
    import asyncio

    error = None
    try:
        while True:
            frame = await asyncio.wait_for(ws.recv(), timeout)
            assert isinstance(frame, str)
            message = json.loads(frame)
            if message.get("type") == "error":
                error = message
    except ConnectionClosed as exc:
        rcvd = exc.rcvd
        return Closed(error, rcvd.code if rcvd else None, rcvd.reason if rcvd else "")
