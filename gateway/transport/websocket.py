"""The server's WebSocket connection, made to be freed as soon as it closes.

A websockets ``ServerConnection`` ends in reference cycles that only the cyclic
garbage collector can free, and the gateway runs that collector rarely
(:func:`gateway.cli.tune_gc`): a reconnect storm left ten thousand closed
connections (940,000 objects, and their buffers) waiting for a full collection, which
then took 1.4 s of CPU. Two cycles held each one; :class:`ClientSocket` leaves neither:

* ``serve(select_subprotocol=...)`` wraps the callback in a closure over the connection
  and binds it to the connection's protocol: connection, protocol, closure, connection.
  Here the callback is a plain function that needs no connection (:func:`pick_subprotocol`).
* The protocol's parser is a generator that stays suspended after the last byte, its
  frame holding the protocol; when the connection was dropped mid-frame, the error it
  kept holds that frame through its traceback. On ``connection_lost`` the generator is
  closed and the traceback let go (the error itself stays, for ``ConnectionClosed``).

With both gone, a connection is freed by reference counting the moment its handler and
the server let go of it (``tests/transport/test_websocket.py`` checks that none is left
to collect).

The opening handshake is websockets' own, made lean (:meth:`ClientSocket.handshake`):
an upgrade is answered as soon as its request is in, without ``asyncio.wait`` on two
futures, a ``send_context`` around the write of the ``101`` and, when the server is
given :class:`~gateway.transport.deadline.Deadlines` for handshakes, without an
``asyncio.timeout`` per connection (serve it with ``open_timeout=None``). py-spy put
those at about a tenth of a drop storm's CPU; without them a restore cost 4-13 % less
(docs/benchmarks.md). Every other answer (an HTTP response, a refusal) goes through
websockets' path unchanged.

A frame that can be dealt with at once (a phone caller's audio, a client's turn or ack)
need not be queued for the handler either: :func:`taken_now` offers it to the socket's
``take_now`` from ``data_received``, when the reader waits with nothing ahead of it.
The agent link's socket does the same (:class:`~gateway.transport.downstream.AgentSocket`).
When what arrived is exactly one whole, small text frame, the client's socket does not
even hand it to websockets' parser (:func:`whole_text_frame`). The other way, frames the
gateway writes at once (an ack, a caller's audio) are framed here when websockets would
frame them the same, several in one write (:func:`text_frames`).

An open connection also keeps its upgrade request and response, headers and all, for its
whole life: 2 KiB of the 16 KiB an idle session costs. Nothing reads them past the hello
(its token may come in the upgrade), so :func:`forget_upgrade` lets them go.
"""

from __future__ import annotations

import asyncio
import http
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.frames import Frame, Opcode
from websockets.http11 import SERVER, Request, Response
from websockets.protocol import Event, Protocol, Side, State
from websockets.server import ServerProtocol
from websockets.streams import StreamReader
from websockets.typing import Subprotocol

try:
    # websockets' C unmasking, which its own parser uses; websockets.utils holds the
    # pure-Python fallback, six times slower on a turn's frame (0.64 against 0.10 us).
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - a websockets built without its extension
    from websockets.utils import apply_mask

from gateway.transport.deadline import Deadline, Deadlines

__all__ = [
    "SUBPROTOCOL",
    "ClientSocket",
    "ProcessRequest",
    "ProcessResponse",
    "forget_upgrade",
    "pick_subprotocol",
    "text_frames",
    "whole_text_frame",
]

log = logging.getLogger("gateway")

ProcessResponse = Callable[
    [ServerConnection, Request, Response], Awaitable[Response | None] | Response | None
]
ProcessRequest = Callable[[ServerConnection, Request], Awaitable[Response | None] | Response | None]

SUBPROTOCOL = Subprotocol("hangon.v1")
"""The subprotocol the gateway answers when offered; offering it is optional."""


def taken_now(ws: Connection, event: Event, take_now: Callable[[str], bool] | None) -> bool:
    """Whether ``take_now`` dealt with ``event`` as it was parsed, in ``data_received``,
    sparing it websockets' queue, a future and the reader's wake-up and ``recv``.

    Only a whole text frame is offered, and only while the reader waits in ``recv`` with
    nothing queued ahead of it, so that frames are dealt with in the order they came.
    ``take_now`` returns ``False`` to leave the frame, untouched, to the reader; if it
    raises, the frame is logged and dropped, as a reader would.
    """
    if take_now is None or type(event) is not Frame or event.opcode is not Opcode.TEXT:
        return False
    if not event.fin or not _reader_idle(ws):
        return False
    try:
        text = str(event.data, "utf-8")
    except UnicodeDecodeError:
        return False  # websockets' own path refuses it
    return _offer(take_now, text)


def _reader_idle(ws: Connection) -> bool:
    """The reader waits in ``recv`` with nothing queued ahead of the next frame."""
    messages = ws.recv_messages
    return messages.get_in_progress and not len(messages.frames)


def _offer(take_now: Callable[[str], bool], text: str) -> bool:
    try:
        return take_now(text)
    except Exception:
        log.exception("frame not taken")
        return True


_AT_EOF = StreamReader.at_eof.__code__


def whole_text_frame(protocol: Protocol, data: bytes) -> str | None:
    """The text of ``data`` if it is exactly one whole text frame that websockets' parser
    would take as one: unfragmented, masked (as a client's must be), its length in 7 or
    16 bits and within ``max_size``, valid UTF-8, on an open connection whose parser waits
    at a frame boundary with nothing buffered and no fragmented message under way.
    ``None`` for anything else, which websockets' parser is then given, as if this had
    not been called.

    That spares a client's small frame (a turn, an ack, a phone caller's 20 ms of audio)
    the parser's chain of generators: about a tenth of a turn's CPU in py-spy. The
    boundary is read off the parser itself, suspended in its reader's ``at_eof``; a
    websockets that parses some other way finds no boundary here, and parses everything.
    """
    size = len(data)
    if size < 6 or data[0] != 0x81:  # FIN, no RSV bit, text
        return None
    length = data[1] ^ 0x80  # the mask bit must be set: a length of 0-125, or 126
    if length < 126:
        start = 6
    elif length == 126 and size >= 8:
        length = int.from_bytes(data[2:4], "big")
        start = 8
    else:
        return None
    if size != start + length or protocol.state is not State.OPEN or protocol.reader.buffer:
        return None
    if getattr(protocol, "current_size", 0) is not None:
        return None  # a fragmented message is under way: websockets refuses a new one
    limit = getattr(protocol, "max_message_size", 0)
    fragment = getattr(protocol, "max_fragment_size", None)
    if (limit is not None and length > limit) or (fragment is not None and length > fragment):
        return None
    parser: Any = protocol.parser
    while (inner := parser.gi_yieldfrom) is not None:
        parser = inner
    if parser.gi_code is not _AT_EOF:
        return None  # mid-frame: its first bytes were taken already
    try:
        return str(apply_mask(data[start:], data[start - 4 : start]), "utf-8")
    except UnicodeDecodeError:
        return None  # websockets' own path refuses it


def text_frames(protocol: Protocol, frames: Sequence[bytes]) -> bytes | None:
    """The bytes websockets would write for ``frames`` sent as whole text frames from
    the server side (unmasked), when nothing else makes them differ: the connection
    open, no extension, no fragmented message being sent, nothing it queued unwritten,
    no debug log of each frame. ``None`` otherwise: send them through websockets.

    That spares a client's ack (and a caller's audio) websockets' ``Frame``, its
    checks and its ``BytesIO``, and writes several frames as one.
    """
    if (
        protocol.side is not Side.SERVER
        or protocol.state is not State.OPEN
        or protocol.expect_continuation_frame
        or protocol.extensions
        or protocol.writes
        or protocol.debug
    ):
        return None
    if len(frames) == 1:
        (frame,) = frames
        size = len(frame)
        if size < 126:  # the usual case: one small frame
            return bytes((0x81, size)) + frame
    parts: list[bytes] = []
    for frame in frames:
        size = len(frame)
        if size < 126:
            parts.append(bytes((0x81, size)))
        elif size < 65536:
            parts.append(b"\x81\x7e" + size.to_bytes(2, "big"))
        else:
            parts.append(b"\x81\x7f" + size.to_bytes(8, "big"))
        parts.append(frame)
    return b"".join(parts)


def pick_subprotocol(offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``hangon.v1`` when the client offers it (a browser passing its token beside it
    offers both, and fails the connection unless the answer names one of its offers);
    otherwise none, rather than websockets' refusal of unknown offers."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class ClientSocket(ServerConnection):
    """A ``ServerConnection`` that no reference cycle outlives, with a lean opening
    handshake (see the module docstring); pass it as ``serve(create_connection=...)``,
    without ``select_subprotocol`` or ``process_response``.

    Args:
        handshakes: The server's handshake deadlines: a connection whose upgrade is not
            answered by then is reset. Without them, ``serve``'s ``open_timeout`` is
            the bound.
    """

    take_now: Callable[[str], bool] | None = None
    """Set by the handler: deals with a frame as it is read, when it can (a caller's
    audio, a client's turn or ack), see :func:`taken_now`."""

    def __init__(
        self,
        protocol: ServerProtocol,
        server: Server,
        *,
        handshakes: Deadlines[ClientSocket] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(protocol, server, **kwargs)
        # An instance attribute is called unbound: protocol.select_subprotocol(offered).
        protocol.select_subprotocol = pick_subprotocol  # type: ignore[method-assign,assignment]
        self._handshakes = handshakes
        self._handshake_by: Deadline[ClientSocket] | None = None

    def connection_made(self, transport: Any) -> None:
        super().connection_made(transport)
        if self._handshakes is not None:
            self._handshake_by = self._handshakes.add(self)

    def handshake_overdue(self) -> bool:
        """For the server's handshake :class:`Deadlines`: reset the connection if it is
        still not upgraded (its handler then ends, as after ``open_timeout``); return
        whether it was."""
        if self.protocol.state is not State.CONNECTING:
            return False
        log.debug("upgrade not finished in time: connection reset")
        self.transport.abort()
        return True

    async def handshake(
        self,
        process_request: ProcessRequest | None = None,
        process_response: ProcessResponse | None = None,
        server_header: str | None = SERVER,
    ) -> None:
        """websockets' opening handshake, with the upgrade answered straight away.

        Waits for the request alone (:meth:`connection_lost` settles that wait too);
        the ``101`` is written without a ``send_context``: it is the first write on an
        empty buffer, and a failure to write it ends the handshake with the error, so
        that websockets resets the connection and runs no handler, as its own would.
        """
        assert process_response is None, "ClientSocket takes no process_response"
        await self.request_rcvd
        request = self.request
        if request is None:
            return  # the connection was lost first
        response = None
        if process_request is not None:
            try:
                answer = process_request(self, request)
                if answer is None or isinstance(answer, Response):
                    response = answer  # an upgrade's check answers at once
                else:
                    # A probe that awaits (the store) gets what is left of the deadline.
                    by = self._handshake_by
                    async with asyncio.timeout_at(None if by is None else by.when):
                        response = await answer
            except Exception as exc:
                self.protocol.handshake_exc = exc
                self.logger.error("process_request failed", exc_info=True)
                response = self.protocol.reject(
                    http.HTTPStatus.INTERNAL_SERVER_ERROR,
                    "Failed to open a WebSocket connection.\n"
                    "See server log for more information.\n",
                )
        if response is None and self.server.is_serving():
            response = self.response = self.protocol.accept(request)
        else:
            if response is None:
                # The server began closing during the handshake.
                response = self.protocol.reject(
                    http.HTTPStatus.SERVICE_UNAVAILABLE, "Server is shutting down.\n"
                )
            self.response = response
        if server_header is not None:
            response.headers["Server"] = server_header
        if self.state is not State.CONNECTING:
            return  # lost during process_request: nothing to answer
        if response.status_code == http.HTTPStatus.SWITCHING_PROTOCOLS:
            self.protocol.send_response(response)  # the connection is open from here
            try:
                self.send_data()
            except Exception as exc:
                # As send_context would: no handler for a connection that never opened.
                self.set_connection_exc(exc)
                self.transport.abort()
                raise
        else:
            # A refusal or an HTTP answer: websockets' path, which then closes the
            # connection.
            async with self.send_context(expected_state=State.CONNECTING):
                self.protocol.send_response(response)
        self._upgraded()

    def data_received(self, data: bytes) -> None:
        """A whole text frame for ``take_now`` skips websockets' parser too
        (:func:`whole_text_frame`); anything else takes websockets' path."""
        take_now = self.take_now
        if take_now is not None and _reader_idle(self):
            text = whole_text_frame(self.protocol, data)
            if text is not None and _offer(take_now, text):
                return
        super().data_received(data)

    def process_event(self, event: Event) -> None:
        if not taken_now(self, event, self.take_now):
            super().process_event(event)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """websockets' ``close``, returning at once when the connection is already gone
        (a dropped client, when its handler returns): websockets' own finds that out
        through a ``send_context``, a ``Timeout`` and a ``ConnectionClosed`` raised and
        swallowed."""
        if self.connection_lost_waiter.done():
            return
        await super().close(code, reason)

    def _upgraded(self) -> None:
        if self._handshake_by is not None:
            self._handshake_by.cancel()
            self._handshake_by = None

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.request_rcvd.done():
            self.request_rcvd.set_result(None)  # the handshake waits for nothing more
        self._upgraded()
        super().connection_lost(exc)
        protocol = self.protocol
        # The stream is at its end (super() fed it), so the parser is never stepped again.
        protocol.parser.close()
        if protocol.parser_exc is not None:
            protocol.parser_exc.__traceback__ = None


def forget_upgrade(ws: ServerConnection) -> None:
    """Let go of ``ws``'s upgrade headers and response, once the hello has read what it
    needs; the request's path stays (websockets needs a request to be there)."""
    request = ws.request
    if request is not None and request.headers:
        ws.request = Request(request.path, Headers())
    ws.response = None
