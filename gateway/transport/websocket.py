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

An open connection also keeps its upgrade request and response, headers and all, for its
whole life: 2 KiB of the 16 KiB an idle session costs. Nothing reads them past the hello
(its token may come in the upgrade), so :func:`forget_upgrade` lets them go.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from websockets.asyncio.server import Server, ServerConnection
from websockets.datastructures import Headers
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

__all__ = ["SUBPROTOCOL", "ClientSocket", "forget_upgrade", "pick_subprotocol"]

SUBPROTOCOL = Subprotocol("hangon.v1")
"""The subprotocol the gateway answers when offered; offering it is optional."""


def pick_subprotocol(offered: Sequence[Subprotocol]) -> Subprotocol | None:
    """``hangon.v1`` when the client offers it (a browser passing its token beside it
    offers both, and fails the connection unless the answer names one of its offers);
    otherwise none, rather than websockets' refusal of unknown offers."""
    return SUBPROTOCOL if SUBPROTOCOL in offered else None


class ClientSocket(ServerConnection):
    """A ``ServerConnection`` that no reference cycle outlives (see the module docstring);
    pass it as ``serve(create_connection=ClientSocket)``, without ``select_subprotocol``."""

    def __init__(self, protocol: ServerProtocol, server: Server, **kwargs: Any) -> None:
        super().__init__(protocol, server, **kwargs)
        # An instance attribute is called unbound: protocol.select_subprotocol(offered).
        protocol.select_subprotocol = pick_subprotocol  # type: ignore[method-assign,assignment]

    def connection_lost(self, exc: Exception | None) -> None:
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
