"""The gateway server: accepts WebSocket clients and answers HTTP probes on one port.

``GET /healthz`` answers while the event loop runs; ``GET /readyz`` answers 200
only when the store answers a ping and the server is not draining;
``GET /metrics`` is the Prometheus text format; ``GET /`` is the demo page (the
demo voice form in the browser); ``GET /client.js`` and
``GET /client.d.ts`` are the browser client and its types. The WebSocket
endpoint is ``--path`` (``/ws``), and Twilio Media Streams connect at
``--twilio-path`` (``/v1/twilio``), where the upgrade's ``X-Twilio-Signature``
is checked (403 if wrong) when an auth token is set; any other path is 404.

A drain (SIGTERM) fails ``/readyz`` at once and refuses new WebSocket upgrades
with 503 and ``Retry-After`` (a balancer retries them on another instance), then
closes every client with 1012 over ``--drain-period`` seconds, each at a random
moment, after persisting what its agent sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import logging
import math
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Iterable
from importlib import resources
from types import TracebackType
from typing import cast

from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers, MultipleValuesError
from websockets.http11 import Request, Response

from gateway.config import Config
from gateway.core.auth import Verifier
from gateway.core.backoff import backoff
from gateway.core.sealing import Keyring
from gateway.core.twilio import signature_valid
from gateway.demo_agent import serve_demo_agent
from gateway.exceptions import StoreError, StoreTimeout
from gateway.metrics import Metrics
from gateway.store.base import SessionStore, StoreSettings
from gateway.store.memory_store import MemoryStore
from gateway.store.redis_store import RedisStore
from gateway.transport.client_ws import handle_client
from gateway.transport.deadline import Deadlines
from gateway.transport.keepalive import Keepalive
from gateway.transport.sessions import Sessions, now_ms
from gateway.transport.websocket import SUBPROTOCOL, ClientSocket

__all__ = ["SUBPROTOCOL", "Gateway", "instance_id", "open_store"]

log = logging.getLogger("gateway.server")

_READY_TIMEOUT = 1.0
_STATIC = {
    "/client.js": ("client.js", "text/javascript; charset=utf-8"),
    "/client.d.ts": ("client.d.ts", "application/typescript; charset=utf-8"),
}
"""Files served as they are: path to (file in gateway/static, content type)."""


def _static(name: str) -> bytes:
    return resources.files("gateway").joinpath("static", name).read_bytes()


def instance_id() -> str:
    """A fresh instance ID: host name, process ID and a random suffix (restarts differ)."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


def open_store(config: Config, *, metrics: Metrics | None = None) -> SessionStore:
    """Create the store ``config`` names: Redis if a URL is set, else memory.

    Args:
        metrics: Where a Redis store counts its round trips.
    """
    s, sec = config.store, config.security
    settings = StoreSettings(
        key_prefix=s.key_prefix,
        ttl=s.ttl,
        end_ttl=s.end_ttl,
        max_age=s.max_age,
        replay_window=s.replay_window,
        lease=s.owner_lease,
        # Config requires keys with Redis; the embedded store may do with random ones.
        keyring=Keyring(sec.state_keys, sec.caller_hash_key)
        if sec.state_keys and sec.caller_hash_key is not None
        else Keyring.generate(),
    )
    if s.redis_url is None:
        return MemoryStore(settings)
    return RedisStore(
        s.redis_url,
        settings,
        socket_timeout=s.redis_timeout,
        connect_timeout=s.redis_connect_timeout,
        max_connections=s.redis_max_connections,
        ack_replicas=s.ack_replicas,
        on_round_trip=None if metrics is None else functools.partial(_round_trip, metrics),
    )


def _round_trip(metrics: Metrics, ops: int) -> None:
    metrics.store_round_trips.inc()
    if ops:
        metrics.store_pipeline_ops.observe(ops)


class Gateway:
    """A running gateway: store, metrics and the WebSocket server.

    Args:
        config: Settings.
        store: Use this store instead of the one ``config`` names.
        metrics: Use these metrics (and their registry) instead of fresh ones.
        delays: Retry delays per store operation; backoff from ``config`` by default.
        clock: Milliseconds since the epoch.

    With ``--downstream demo`` the demo agent runs in this process on a loopback
    port of its own, and sessions reach it as they would a remote agent.
    """

    def __init__(
        self,
        config: Config,
        *,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
        delays: Callable[[], Iterable[float]] | None = None,
        clock: Callable[[], int] = now_ms,
    ) -> None:
        self.config = config
        self.metrics = (
            metrics if metrics is not None else Metrics(tenants=config.limits.metrics_tenants)
        )
        self.store = store if store is not None else open_store(config, metrics=self.metrics)
        self.instance = config.server.instance_id or instance_id()
        s = config.store
        self.sessions = Sessions(
            config,
            store=self.store,
            metrics=self.metrics,
            delays=delays
            or functools.partial(
                backoff,
                initial_delay=s.retry_initial_delay,
                max_delay=s.retry_max_delay,
                attempts=s.retry_attempts,
            ),
            agent_delays=functools.partial(
                backoff, initial_delay=0.1, max_delay=config.agent.agent_retry_max_delay
            ),
            clock=clock,
            instance=self.instance,
            verifier=Verifier(
                config.security.auth_keys,
                leeway=config.security.auth_leeway,
                default_region=config.caller.default_region,
            )
            if config.security.auth_keys
            else None,
        )
        admission = self.sessions.admission
        self.metrics.admission_waiting.set_function(lambda: admission.waiting)
        self.metrics.admission_restoring.set_function(lambda: admission.restoring)
        down = config.agent.downstream
        if down.startswith(("ws://", "wss://")):
            self.sessions.downstream = down
        self.demo_agent: Server | None = None
        self.server: Server | None = None
        self.closing = False
        self._listener: asyncio.Task[None] | None = None
        self._keepalive: asyncio.Task[None] | None = None
        self._handshakes: Deadlines[ClientSocket] | None = None
        # Static files, read once; the demo page pointed at this gateway's WebSocket path.
        self._files = {path: (_static(name), kind) for path, (name, kind) in _STATIC.items()}
        self._files["/"] = (
            _static("index.html").replace(
                b'name="hangon-path" content="/ws"',
                f'name="hangon-path" content="{html.escape(config.server.path)}"'.encode(),
            ),
            "text/html; charset=utf-8",
        )

    @property
    def port(self) -> int:
        """The port the server listens on (useful with port 0)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        """Start listening (and the in-process demo agent, if configured)."""
        if self.config.agent.downstream == "demo":
            self.demo_agent = await serve_demo_agent("127.0.0.1", 0)
            port = self.demo_agent.sockets[0].getsockname()[1]
            self.sessions.downstream = f"ws://127.0.0.1:{port}/"
        max_size = self.config.limits.max_message_size
        self._handshakes = Deadlines(self.config.limits.handshake_timeout, self._upgrade_overdue)
        self.server = await serve(
            self._client,
            self.config.server.host,
            self.config.server.port,
            process_request=self._http,
            # Frames up to twice the limit reach the protocol, which answers with an
            # error frame; websockets drops larger ones itself with 1009.
            max_size=2 * max_size,
            # One task pings every connection (gateway.transport.keepalive), rather than
            # a task per connection.
            ping_interval=None,
            ping_timeout=None,
            compression=None,
            # Freed by reference counting once closed; answers "hangon.v1" when offered;
            # the handshake's deadline kept with every other connection's, not a timer
            # of its own (open_timeout).
            create_connection=cast(
                type[ClientSocket], functools.partial(ClientSocket, handshakes=self._handshakes)
            ),
            open_timeout=None,
            close_timeout=5,
            backlog=self.config.server.backlog,
            reuse_port=self.config.server.workers > 1,
        )
        self._listener = asyncio.create_task(
            self.store.listen(self.instance, self.sessions.taken_over)
        )
        keepalive = self.config.keepalive
        if keepalive.ping_interval is not None:
            pings = Keepalive(
                lambda: self.sessions.connections,
                interval=keepalive.ping_interval,
                timeout=keepalive.ping_timeout,
            )
            self._keepalive = asyncio.create_task(pings.run())

    async def drain(self) -> None:
        """Fail readiness, refuse new clients, close the others with 1012 over the drain period."""
        self.closing = True
        self.metrics.draining.set(1)
        await self.sessions.drain(self.config.server.drain_period)

    async def aclose(self) -> None:
        """Stop accepting, close every client with 1001, then agent links, then the store."""
        self.closing = True
        for task in (self._listener, self._keepalive):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        if self._handshakes is not None:
            self._handshakes.close()
        await self.sessions.aclose()
        if self.demo_agent is not None:
            self.demo_agent.close()
            await self.demo_agent.wait_closed()
        await self.store.aclose()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _upgrade_overdue(self, ws: ClientSocket) -> None:
        if ws.handshake_overdue():
            self.metrics.upgrade_timeouts.inc()

    async def _client(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        path = ws.request.path.partition("?")[0]
        await handle_client(self.sessions, ws, twilio=path == self.config.twilio.twilio_path)

    def _http(
        self, connection: ServerConnection, request: Request
    ) -> Response | Awaitable[Response] | None:
        """Answer an HTTP request, or let an upgrade through (``None``); only ``/readyz``
        needs to await (the store), so an upgrade is checked without a coroutine."""
        path, _, query = request.path.partition("?")
        twilio = path == self.config.twilio.twilio_path
        if path == self.config.server.path or twilio:
            if self.closing:
                response = connection.respond(503, "draining: connect to another instance\n")
                response.headers["Retry-After"] = "1"
                return response
            if self.sessions.admission.full():
                # Refused before the WebSocket opens: the cheapest "later" there is.
                self.metrics.shed.labels("upgrade").inc()
                response = connection.respond(503, "overloaded: try again later\n")
                wait = self.sessions.admission.retry_after()
                response.headers["Retry-After"] = str(max(1, math.ceil(wait)))
                return response
            if not twilio and not self._origin_allowed(request):
                self.metrics.auth_failures.labels("origin").inc()
                log.warning("upgrade refused: origin not allowed path=%s", path)
                return connection.respond(403, "Origin not allowed\n")
            if twilio and not self._signed(request, path, query):
                self.metrics.auth_failures.labels("twilio_signature").inc()
                log.warning("twilio stream refused: bad X-Twilio-Signature path=%s", path)
                return connection.respond(403, "X-Twilio-Signature does not match\n")
            return None
        if path == "/healthz":
            return connection.respond(200, "ok\n")
        if path == "/readyz":
            return self._ready(connection)
        if path == "/metrics":
            return _response(self.metrics.render(), CONTENT_TYPE_LATEST)
        if path in self._files:
            return _response(*self._files[path])
        return connection.respond(404, "not found\n")

    def _origin_allowed(self, request: Request) -> bool:
        """Whether a browser's ``Origin`` is allowed (always, without an allowlist or header)."""
        allowed = self.config.security.allowed_origins
        if not allowed:
            return True
        try:
            origin = request.headers.get("Origin")
        except MultipleValuesError:
            return False
        return origin is None or origin.rstrip("/") in allowed

    def _signed(self, request: Request, path: str, query: str) -> bool:
        """Whether a Twilio upgrade carries Twilio's signature (always, with no token set)."""
        t = self.config.twilio
        if not t.twilio_auth_token:
            return True
        try:
            host = request.headers.get("Host", "")
            header = request.headers.get("X-Twilio-Signature")
        except MultipleValuesError:
            return False  # Twilio sends one of each
        url = t.twilio_url or f"wss://{host}{path}"
        if query:
            url = f"{url}?{query}"
        return signature_valid(t.twilio_auth_token, url, header)

    async def _ready(self, connection: ServerConnection) -> Response:
        if self.closing:
            return connection.respond(503, "shutting down\n")
        try:
            with self.metrics.store_seconds.labels("ping").time():
                try:
                    await asyncio.wait_for(self.store.ping(), _READY_TIMEOUT)
                except TimeoutError:
                    raise StoreTimeout("ping", f"no answer in {_READY_TIMEOUT} s") from None
        except StoreError as exc:
            self.metrics.store_error(exc)
            return connection.respond(503, f"store unavailable: {exc}\n")
        return connection.respond(200, "ready\n")


def _response(body: bytes, content_type: str) -> Response:
    headers = Headers([("Content-Type", content_type), ("Content-Length", str(len(body)))])
    return Response(200, "OK", headers, body)
