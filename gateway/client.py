"""An asyncio client for protocol v1 that survives drops: for tests, load tests and bridges.

:class:`Client` keeps one caller's session across any number of connections.
It sends ``hello`` with the resume token and the last agent message it has
(``last_seq``), acknowledges messages, and reconnects by itself after a drop
with exponential backoff and full jitter (:func:`gateway.core.backoff.backoff`),
waiting at least as long as a ``Retry-After`` the server sent with a refused
upgrade, or the ``retry_after`` of an error frame (an overloaded gateway's
1013). WebSocket pings detect a dead connection (``heartbeat_interval``,
``heartbeat_timeout``). Turns not yet acknowledged are sent again, in order,
with the same turn IDs after every reconnect, so each is applied once.

A close in the terminal range (4500-4999: replaced, refused, ended), a ``bye``
or a protocol error (1003, 1007, 1008, 1009) stops the client: :meth:`run`
raises :class:`~gateway.exceptions.ClientClosed` naming the code. Anything
else (1001, 1006, 1011, 1012, 1013, 4000-4499, a refused or failed connect) is
followed by a reconnect.

Example::

    client = Client("ws://127.0.0.1:8765/ws", {"phone": "+14155550100", "call_id": "c1"},
                    on_message=lambda data, seq: print(seq, data))
    runner = asyncio.create_task(client.run())
    version = await client.turn(text="Ada")
    await client.bye()
    await runner
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from gateway.core.backoff import backoff
from gateway.exceptions import ClientClosed

__all__ = ["Client", "Restored", "reconnects"]

log = logging.getLogger("gateway.client")

_TERMINAL = frozenset({1000, 1003, 1007, 1008, 1009})
"""Close codes below 4000 after which the client must not come back as it was."""


def reconnects(code: int | None) -> bool:
    """Whether a connection closed with ``code`` (``None``: no close frame) is resumed."""
    if code is None:
        return True
    return not (code in _TERMINAL or 4500 <= code <= 4999)


@dataclass(frozen=True, slots=True)
class Restored:
    """What a ``welcome`` said: the session, its state and how it came back."""

    session_id: str
    resumed: bool
    stale: bool
    version: int
    state: dict[str, Any]
    replay_from: int | None
    """The first message replayed when some were lost (``replay: partial``); else ``None``."""
    degraded: bool = False
    """The store was unreachable: the session is new and not yet durable; turns wait, and
    another :class:`Restored` follows once the store answers."""


class Client:
    """One caller's session, over as many connections as it takes.

    Args:
        url: The gateway's WebSocket endpoint (``ws://host:port/ws``).
        caller: The ``caller`` object of ``hello`` (``phone`` or ``user_id``, ``call_id``).
        tenant: The ``tenant`` of ``hello``, if any.
        token: A signed client token for ``hello`` (a gateway with authentication on
            requires one), or a function returning one (or an awaitable of one), called
            before every hello; with a function, a ``token_expired`` refusal gets a fresh
            token and a reconnect instead of stopping the client.
        resume_token: A token from an earlier run of this caller, to resume its session.
        last_seq: The newest agent message an earlier run handled.
        on_restored: Called with each :class:`Restored`, after every ``welcome``.
        on_message: Called with each agent message's data and number, once each, in order.
        on_state: Called with the session state whenever the agent changes it.
        on_reconnecting: Called with the close code (``None``: no close) and the delay
            before the next attempt.
        initial_delay: Upper bound of the first reconnect delay, seconds (0.5).
        max_delay: Cap on the reconnect delay, seconds (30).
        heartbeat_interval: Seconds between pings (15); ``None`` disables them.
        heartbeat_timeout: Seconds to wait for a pong before the connection counts as dead (10).
        open_timeout: Seconds to wait for the WebSocket handshake (10).
        max_attempts: Connection attempts in a row before :meth:`run` gives up; ``None``:
            never.
        local_addr: The local ``(host, port)`` to connect from (load tests spread many
            clients over 127.0.0.x to have enough source ports).
    """

    def __init__(
        self,
        url: str,
        caller: Mapping[str, Any],
        *,
        tenant: str | None = None,
        token: str | Callable[[], str | Awaitable[str]] | None = None,
        resume_token: str | None = None,
        last_seq: int = 0,
        on_restored: Callable[[Restored], None] | None = None,
        on_message: Callable[[Any, int], None] | None = None,
        on_state: Callable[[dict[str, Any]], None] | None = None,
        on_reconnecting: Callable[[int | None, float], None] | None = None,
        initial_delay: float = 0.5,
        max_delay: float = 30.0,
        heartbeat_interval: float | None = 15.0,
        heartbeat_timeout: float | None = 10.0,
        open_timeout: float = 10.0,
        max_attempts: int | None = None,
        local_addr: tuple[str, int] | None = None,
    ) -> None:
        self.url = url
        self.caller = dict(caller)
        self.tenant = tenant
        self.token = token
        self.resume_token = resume_token
        self.last_seq = last_seq
        self.session_id: str | None = None
        self.state: dict[str, Any] = {}
        self.version = 0
        self.on_restored = on_restored
        self.on_message = on_message
        self.on_state = on_state
        self.on_reconnecting = on_reconnecting
        self.initial_delay = initial_delay
        self.max_delay = max_delay
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.open_timeout = open_timeout
        self.max_attempts = max_attempts
        self.local_addr = local_addr
        # Passed on to loop.create_connection; typed loosely, as websockets' connect is.
        self._connect_kwargs: dict[str, Any] = {}
        if local_addr is not None:
            self._connect_kwargs["local_addr"] = local_addr
        self.connected = asyncio.Event()
        """Set while a connection is open and welcomed."""
        self.connects = 0
        """Welcomes received: 1 plus the number of reconnects."""
        self._ws: ClientConnection | None = None
        self._unacked: dict[str, tuple[str, asyncio.Future[int]]] = {}
        self._closing = False
        self._said_bye = False
        self._welcomed = False
        self._wake = asyncio.Event()
        self._closed: ClientClosed | None = None
        """Set once the client has stopped for good; later calls fail with it."""
        self._retry_after = 0.0
        """Seconds the gateway asked this client to wait before its next attempt."""
        self._expired = False
        """The gateway refused the token as expired, and :attr:`token` can make a new one."""
        self._resending = False
        """A resend of the waiting turns is due, after a nack."""

    async def run(self) -> None:
        """Connect, and reconnect after every drop, until :meth:`bye` or :meth:`aclose`.

        Raises:
            ClientClosed: The gateway closed with a code that forbids resuming, or
                ``max_attempts`` connection attempts failed in a row. Turns still
                waiting for their ack fail with the same error.
        """
        try:
            await self._run()
        except ClientClosed as exc:
            self._fail(exc)
            raise
        except BaseException as exc:
            # A callback raised, or the task was cancelled: nothing will settle the turns.
            self._fail(ClientClosed(None, f"client stopped: {exc!r}"))
            raise
        self._fail(ClientClosed(1000, "closed"))

    async def _run(self) -> None:
        delays: Iterator[float] | None = None
        failures = 0
        while not self._closing:
            code: int | None = None
            wait = 0.0
            self._welcomed = False
            try:
                async with connect(
                    self.url,
                    open_timeout=self.open_timeout,
                    ping_interval=self.heartbeat_interval,
                    ping_timeout=self.heartbeat_timeout,
                    close_timeout=2,
                    compression=None,  # the gateway never negotiates it; offering costs a header
                    **self._connect_kwargs,
                ) as ws:
                    if self._closing:
                        break  # aclose() came while connecting
                    self._ws = ws
                    try:
                        await self._serve(ws)
                    finally:
                        rcvd = ws.protocol.close_rcvd
                    code = rcvd.code if rcvd is not None else None
                    if self._said_bye and rcvd is not None and rcvd.code == 1000:
                        self._closing = True
                    elif rcvd is not None and not self._may_reconnect(rcvd.code):
                        raise ConnectionClosed(rcvd, None)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd else None
                if exc.rcvd is not None and not self._may_reconnect(exc.rcvd.code):
                    raise ClientClosed(code, exc.rcvd.reason) from None
            except InvalidStatus as exc:
                # A draining or overloaded gateway refuses the upgrade and says when to retry.
                wait = _retry_after(exc.response.headers.get("Retry-After"))
            except (OSError, TimeoutError, InvalidHandshake):
                pass
            finally:
                self._ws = None
                self.connected.clear()
            if self._closing:
                break
            wait, self._retry_after = max(wait, self._retry_after), 0.0
            if self._welcomed:
                delays, failures = None, 0  # back to small delays after every welcome
            else:
                failures += 1
            if self.max_attempts is not None and failures >= self.max_attempts:
                raise ClientClosed(None, f"no connection after {failures} attempts")
            if delays is None or wait:
                # A hint means the gateway is up and said when to come back: the backoff
                # built up while it was unreachable no longer applies.
                delays = backoff(initial_delay=self.initial_delay, max_delay=self.max_delay)
            delay = max(wait, next(delays))
            if self.on_reconnecting is not None:
                self.on_reconnecting(code, delay)
            # aclose() cuts the wait short.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):  # unlike wait_for, no task per wait
                    await self._wake.wait()

    def _may_reconnect(self, code: int) -> bool:
        if self._expired:
            self._expired = False
            return True  # with a fresh token
        return reconnects(code) or self._closing

    async def turn(
        self,
        turn_id: str | None = None,
        *,
        text: str | None = None,
        form: Mapping[str, Any] | None = None,
        context: Mapping[str, Any] | None = None,
    ) -> int:
        """Send a turn and return the version its ack names, across reconnects if need be.

        Raises:
            ClientClosed: The client stopped before the turn was acknowledged.
        """
        if self._closed is not None:
            raise self._closed
        turn_id = turn_id or uuid.uuid4().hex
        message: dict[str, Any] = {"type": "turn", "turn_id": turn_id}
        if text is not None:
            message["text"] = text
        if form is not None:
            message["form"] = dict(form)
        if context is not None:
            message["context"] = dict(context)
        frame = json.dumps(message)
        acked: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._unacked[turn_id] = (frame, acked)
        ws = self._ws
        if ws is not None and self.connected.is_set():
            with contextlib.suppress(ConnectionClosed):
                await ws.send(frame)  # else it goes out after the next welcome
        return await acked

    async def bye(self) -> None:
        """End the session: the gateway forgets it after its end TTL, and :meth:`run` returns.

        If the connection is down, ``bye`` goes out after the next ``welcome``.
        """
        if self._closed is not None:
            raise self._closed
        self._said_bye = True
        ws = self._ws
        if ws is not None and self.connected.is_set():
            with contextlib.suppress(ConnectionClosed):
                await ws.send(json.dumps({"type": "bye"}))
                await ws.wait_closed()

    async def aclose(self) -> None:
        """Stop reconnecting and close the connection; the session stays resumable."""
        self._closing = True
        self._wake.set()
        if self._ws is not None:
            await self._ws.close()
        self._fail(ClientClosed(1000, "closed"))

    def abort(self) -> None:
        """Drop the connection without a close frame, as a network blip would (for tests)."""
        if self._ws is not None:
            self._ws.transport.abort()

    async def _serve(self, ws: ClientConnection) -> None:
        hello: dict[str, Any] = {"type": "hello", "caller": self.caller, "last_seq": self.last_seq}
        if self.tenant is not None:
            hello["tenant"] = self.tenant
        if self.resume_token is not None:
            hello["resume_token"] = self.resume_token
        if self.token is not None:
            token = self.token() if callable(self.token) else self.token
            hello["token"] = await token if inspect.isawaitable(token) else token
        await ws.send(json.dumps(hello))
        async for raw in ws:
            frame = json.loads(raw)
            kind = frame.get("type")
            if kind == "welcome":
                await self._welcome(ws, frame)
            elif kind == "msg":
                await self._message(ws, frame)
            elif kind == "state":
                self.state, self.version = frame["state"], frame["version"]
                if self.on_state is not None:
                    self.on_state(self.state)
            elif kind == "nack" and not self._resending:
                # Not stored (the store is out): after the hint, send every turn still
                # waiting again, in order (the gateway nacks turns sent after a nacked one).
                self._resending = True
                delay = min(max(0.0, float(frame.get("retry_after", 1.0))), self.max_delay)
                asyncio.get_running_loop().call_later(delay, self._resend, ws)
            elif kind == "ack":
                pending = self._unacked.pop(frame["turn_id"], None)
                self.version = max(self.version, frame["version"])
                if pending is not None and not pending[1].done():
                    pending[1].set_result(frame["version"])
            elif kind == "error":
                log.info("gateway error code=%s message=%s", frame["code"], frame["message"])
                if frame["code"] == "token_expired" and callable(self.token):
                    self._expired = True
                hint = frame.get("retry_after")
                if isinstance(hint, int | float) and not isinstance(hint, bool):
                    self._retry_after = min(max(0.0, float(hint)), self.max_delay)

    def _resend(self, ws: ClientConnection) -> None:
        """Send the turns still waiting again, in order, on the connection that nacked them."""
        self._resending = False
        if self._ws is not ws or not self.connected.is_set():
            return  # they go out after the next welcome anyway
        for text, _ in list(self._unacked.values()):
            task = asyncio.ensure_future(ws.send(text))
            task.add_done_callback(_quiet)

    async def _welcome(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        if frame.get("degraded"):
            # The store is out: nothing here is authoritative. Keep the position and token
            # (none is offered to a client that sent none); the real welcome follows.
            self.resume_token = self.resume_token or frame["resume_token"] or None
            self.connects += 1
            self._welcomed = True
            self.connected.set()
            if self.on_restored is not None:
                self.on_restored(
                    Restored(frame["session_id"], False, False, 0, {}, None, degraded=True)
                )
            for text, _ in list(self._unacked.values()):
                await ws.send(text)
            return
        if not frame["resumed"]:
            self.last_seq = 0  # a new session numbers its messages from 1
        replay_from = frame.get("replay_from")
        if replay_from is not None:
            self.last_seq = replay_from - 1  # the gap is announced: messages were lost
        self.session_id = frame["session_id"]
        self.resume_token = frame["resume_token"]
        self.state, self.version = frame["state"], frame["version"]
        self.connects += 1
        self._welcomed = True
        self.connected.set()
        if self.on_restored is not None:
            self.on_restored(
                Restored(
                    frame["session_id"],
                    frame["resumed"],
                    frame.get("stale", False),
                    frame["version"],
                    frame["state"],
                    replay_from,
                    frame.get("degraded", False),
                )
            )
        for text, _ in list(self._unacked.values()):
            await ws.send(text)
        if self._said_bye:
            await ws.send(json.dumps({"type": "bye"}))  # the last one was not saved

    async def _message(self, ws: ClientConnection, frame: dict[str, Any]) -> None:
        seq = frame["seq"]
        if seq <= self.last_seq:
            return  # already handled (a replay overlapping what arrived live)
        if self.on_message is not None:
            self.on_message(frame["data"], seq)
        self.last_seq = seq  # handled: a callback that raised leaves it to the replay
        await ws.send(json.dumps({"type": "ack", "seq": seq}))

    def _fail(self, error: ClientClosed) -> None:
        """Stop for good: fail every turn still waiting for its ack, and later calls."""
        if self._closed is None:
            self._closed = error
        for _, acked in self._unacked.values():
            if not acked.done():
                acked.set_exception(error)
        self._unacked.clear()


def _quiet(task: asyncio.Future[None]) -> None:
    """Retrieve a background send's failure: the connection closing is handled elsewhere."""
    if not task.cancelled():
        task.exception()


def _retry_after(value: str | None) -> float:
    """Seconds from a ``Retry-After`` header (delay-seconds form only); 0 if absent or odd."""
    if value is None:
        return 0.0
    try:
        return max(0.0, float(value))
    except ValueError:
        return 0.0
