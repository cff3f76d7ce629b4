"""Hostile peers for tests: a client that stops reading, and the bystander every case keeps.

Each hostile case runs beside a :class:`Bystander`: a well-behaved session whose state
must come out of the attack exactly as it went in, on a connection that stays open.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import Any

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode

from gateway.server import Gateway
from tests.support.gwmetrics import sample
from tests.support.wsclient import ClientConnection, connect, hello, raw_client, recv, url

__all__ = ["Bystander", "NonReader", "agent_cuts", "waiting"]

SECRET = "Bystander-Secret-4155550123"


class Bystander:
    """A session beside the attack, with a secret in its state."""

    CALLER = {"user_id": "bystander", "call_id": "b"}

    def __init__(self, port: int, **hello_fields: Any) -> None:
        self.port = port
        self.hello_fields = hello_fields
        self.ws: ClientConnection | None = None
        self.resume_token = ""
        self.version = 0
        """The newest version of its session this client saw (acks and state changes)."""
        self.seq = 0
        """The newest agent message it saw."""

    async def __aenter__(self) -> Bystander:
        self.ws = await connect(url(self.port))
        welcome = await hello(self.ws, self.CALLER, **self.hello_fields)
        assert welcome["type"] == "welcome", welcome
        self.resume_token = welcome["resume_token"]
        ack = await self._turn("b1", {"secret": SECRET})
        assert ack == {"type": "ack", "turn_id": "b1", "version": 1}
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.ws is not None
        await self.ws.close()

    async def _turn(self, turn_id: str, form: dict[str, Any]) -> dict[str, Any]:
        """Send a turn; return its ack, noting the versions of what an agent said meanwhile."""
        assert self.ws is not None
        await self.ws.send(json.dumps({"type": "turn", "turn_id": turn_id, "form": form}))
        while (frame := await self._recv())["type"] != "ack":
            pass
        self.version = frame["version"]
        return frame

    async def _recv(self, timeout: float = 5) -> dict[str, Any]:
        assert self.ws is not None
        frame = await recv(self.ws, timeout)
        assert frame["type"] in ("ack", "msg", "state", "pong"), frame
        assert SECRET not in json.dumps(frame) or frame["type"] in ("ack", "state"), frame
        if frame["type"] == "state":
            self.version = max(self.version, frame["version"])
        elif frame["type"] == "msg":
            self.seq = max(self.seq, frame["seq"])
        return frame

    async def _quiet(self) -> None:
        """Read until nothing more comes for a moment (an agent's answers)."""
        try:
            while True:
                await self._recv(timeout=0.3)
        except TimeoutError:
            pass

    async def check(self) -> None:
        """The connection stayed open and answering; its next turn lands on exactly the
        version it last saw (nothing else wrote to it), and a resume finds its answers."""
        assert self.ws is not None
        await self._quiet()
        seen = self.version
        await self.ws.send(json.dumps({"type": "ping"}))
        while (await self._recv())["type"] != "pong":
            pass
        ack = await self._turn("b2", {"after": True})
        assert ack == {"type": "ack", "turn_id": "b2", "version": seen + 1}
        await self._quiet()
        async with connect(url(self.port)) as again:
            welcome = await hello(
                again,
                self.CALLER,
                resume_token=self.resume_token,
                last_seq=self.seq,
                **self.hello_fields,
            )
        assert welcome["version"] == self.version
        assert welcome["state"]["form_answers"] == {"secret": SECRET, "after": True}


class NonReader:
    """A raw WebSocket client with a small receive buffer that reads its welcome and then
    never reads again (or reads ``rate`` bytes a second, if given)."""

    def __init__(self, port: int, *, path: str = "/ws", rate: int = 0) -> None:
        self.port = port
        self.path = path
        self.rate = rate
        self.welcome: dict[str, Any] | None = None
        self.closed = asyncio.Event()
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._protocol: ClientProtocol | None = None
        self._trickle: asyncio.Task[None] | None = None

    async def open(self) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.port))
        self._reader, self._writer, self._protocol = await raw_client(
            self.port, sock, path=self.path
        )
        self._protocol.receive_data(await self._reader.readuntil(b"\r\n\r\n"))

    def send(self, message: dict[str, Any]) -> None:
        assert self._protocol is not None and self._writer is not None
        self._protocol.send_text(json.dumps(message).encode())
        self._writer.write(b"".join(self._protocol.data_to_send()))

    def closing(self) -> bool:
        """Whether the connection is going (reset by the gateway, or closed here)."""
        return self._writer is None or self._writer.transport.is_closing()

    async def read_welcome(self) -> dict[str, Any]:
        """Read until the first text frame (the welcome), then stop reading."""
        assert self._reader is not None and self._protocol is not None
        while self.welcome is None:
            data = await self._reader.read(4096)
            assert data, "closed before the welcome"
            self._protocol.receive_data(data)
            for event in self._protocol.events_received():
                if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                    self.welcome = json.loads(event.data)
                    break
        return self.welcome

    def stop_reading(self) -> None:
        """Read nothing more (or trickle at ``rate``), and notice when the gateway hangs up."""
        assert self._writer is not None
        if self.rate:
            self._trickle = asyncio.create_task(self._read_slowly())
        else:
            self._writer.transport.pause_reading()
            self._trickle = asyncio.create_task(self._watch())

    async def _read_slowly(self) -> None:
        assert self._reader is not None
        try:
            while await self._reader.read(self.rate // 10):
                await asyncio.sleep(0.1)
        except ConnectionResetError:
            pass  # reset: what was unread is gone with it
        self.closed.set()

    async def _watch(self) -> None:
        """A paused reader still learns of a reset: writes start failing."""
        assert self._writer is not None
        while not self._writer.transport.is_closing():
            await asyncio.sleep(0.05)
        self.closed.set()

    async def aclose(self) -> None:
        if self._trickle is not None:
            self._trickle.cancel()
            await asyncio.gather(self._trickle, return_exceptions=True)
        if self._writer is not None:
            self._writer.transport.abort()


def agent_cuts(gw: Gateway, reason: str) -> float:
    return sample(gw, "hangon_agent_links_cut_total", reason=reason)


def waiting(gw: Gateway) -> int:
    """The most bytes waiting for any one client connection now, in the gateway's queues."""
    return max(
        (
            c.protocol.buffered + c.ws.transport.get_write_buffer_size()
            for c in gw.sessions.connections
        ),
        default=0,
    )
