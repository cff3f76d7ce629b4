"""The gateway's configuration: one frozen object in groups, read from flags and ``HANGON_*``.

:data:`OPTIONS` is the single table of settings: ``hangon serve --help``, the
environment variables and ``docs/configuration.md`` all follow it. Every
option ``--some-name`` has the variable ``HANGON_SOME_NAME``; a flag beats the
variable, the variable beats the default.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import phonenumbers

from gateway.core.auth import AuthKey, parse_auth_keys
from gateway.core.sealing import parse_key, parse_state_keys
from gateway.exceptions import ConfigError

__all__ = [
    "OPTIONS",
    "AgentConfig",
    "CallerConfig",
    "Config",
    "KeepaliveConfig",
    "LimitsConfig",
    "Option",
    "SecurityConfig",
    "ServerConfig",
    "StoreConfig",
    "TwilioConfig",
]


_MAX_STATE_SIZE = 15 << 20
"""Largest ``--max-state-size``: a sealed state of at most 16 MiB is what the store takes."""
_MAX_INSTANCE_ID = 512
"""Longest ``--instance-id`` in UTF-8 bytes: the store takes an owner of at most that."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = "127.0.0.1"
    """Interface to listen on."""
    port: int = 8765
    """TCP port for WebSocket and HTTP (``/healthz``, ``/readyz``, ``/metrics``); 0 picks one."""
    path: str = "/ws"
    """HTTP path of the protocol v1 WebSocket endpoint."""
    backlog: int = 2048
    """Pending TCP connections the kernel queues (capped by ``net.core.somaxconn``).

    asyncio's default of 100 overflows when a thousand callers reconnect at once,
    and each dropped SYN costs its caller a one-second retransmit."""
    drain_period: float = 10.0
    """Seconds over which a SIGTERM closes clients with 1012, each at a random moment,
    so that a deploy does not set off a reconnect storm of its own."""
    workers: int = 1
    """Processes serving the port (``SO_REUSEPORT``), each its own instance."""
    instance_id: str | None = None
    """This instance's ID in session ownership records; ``None``: host name, PID and a
    random suffix."""


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepaliveConfig:
    ping_interval: float | None = 20.0
    """Seconds between WebSocket pings; ``None`` disables keepalive."""
    ping_timeout: float | None = 20.0
    """Seconds to wait for a pong before dropping the connection; ``None`` waits forever."""


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    redis_url: str | None = None
    """``redis://`` URL of the Redis store (``redis+cluster://`` for a Redis Cluster);
    ``None`` uses the embedded memory store."""
    key_prefix: str = "hangon:"
    """Prefix of every storage key."""
    ttl: float = 3600.0
    """Seconds a session's keys live after its last activity."""
    end_ttl: float = 300.0
    """Seconds a session's keys live after ``bye``."""
    max_age: float | None = 900.0
    """Seconds of inactivity after which stored state is stale and not resumed; ``None``: never."""
    redis_timeout: float = 2.0
    """Seconds to wait for a Redis reply, and for a free connection from the pool."""
    redis_connect_timeout: float = 2.0
    """Seconds to wait for a Redis connection."""
    redis_max_connections: int = 64
    """Redis connections per gateway process; operations queue for a free one."""
    retry_attempts: int = 6
    """Retries of a store operation after a transient error (0 disables retries)."""
    retry_initial_delay: float = 0.05
    """Upper bound, in seconds, of the first retry delay (full jitter, doubling)."""
    retry_max_delay: float = 1.0
    """Cap, in seconds, on a retry delay."""
    retry_budget: float | None = 10.0
    """Seconds after a store operation's first try past which it is not retried; ``None``: no
    limit but ``retry_attempts``. Bounds how long a hello or turn waits before the client
    is told ``store_unavailable``."""
    replay_window: int = 128
    """Agent messages kept per session for a client that missed them; older ones are dropped
    and a client that missed them is told ``"replay": "partial"``."""
    owner_lease: float = 60.0
    """Seconds an instance's ownership of a session lasts; renewed every third of it
    while the session is served."""
    ack_replicas: int = 0
    """Replicas that must hold a write (Redis ``WAIT``) before it is acknowledged; 0: the
    primary's word is enough."""
    degrade_after: float | None = 2.0
    """Seconds a hello waits for an unreachable store before its session opens *degraded*:
    new, held in this process, its turns waiting for the store (``welcome`` says
    ``degraded: true``, and a second ``welcome`` follows once the store answers). ``None``:
    the hello waits through every retry, then gets ``store_unavailable``."""


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    downstream: str = "demo"
    """The voice agent: a ``ws://`` or ``wss://`` URL, ``demo`` (the demo agent, run
    in-process) or ``off`` (no agent: sessions only store state)."""
    agent_linger: float = 30.0
    """Seconds a session keeps its agent link after the client dropped without ``bye``;
    what the agent says meanwhile is stored and replayed. 0 closes the link at once."""
    agent_open_timeout: float = 5.0
    """Seconds to wait for the agent's WebSocket handshake."""
    agent_retry_max_delay: float = 5.0
    """Cap, in seconds, on the delay between redials of a dropped agent link."""


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_message_size: int = 65536
    """Largest client frame in bytes; larger ones get ``message_too_big`` and close 1009."""
    max_state_size: int = 262144
    """Largest session state in bytes of JSON; a turn growing it further gets ``state_too_big``."""
    max_restores: int = 128
    """Hellos restoring at once; more wait their turn, in arrival order."""
    restore_queue: int = 20000
    """Hellos waiting for a restore beyond which new ones are refused with 1013 (and upgrades
    with 503), each told when to come back."""
    max_turns_per_second: float | None = 20.0
    """Turns one connection may send per second on average (``--turn-burst`` at once); more
    get ``rate_limited`` and close 4008. ``None``: no limit."""
    turn_burst: int = 40
    """Turns one connection may send at once (its re-sent turns after a reconnect count)."""
    metrics_tenants: int = 100
    """Tenants that get their own label in per-tenant metrics (first come); the rest are
    counted under ``other``, so a flood of tenant names cannot blow up the metrics."""
    max_tenant_connections: int | None = None
    """Connections that said hello one tenant may hold on this instance; more get
    ``tenant_limit`` and close 1013. ``None``: no limit."""
    hello_timeout: float | None = 10.0
    """Seconds a new connection has to send its hello; then ``hello_timeout``, close 4002.
    ``None``: forever."""
    send_timeout: float = 20.0
    """Seconds a frame, ping or close may wait for a peer (client, phone stream or agent)
    to read it; a client past it is cut with ``slow_consumer`` (close 4009, or a reset if
    it reads nothing), an agent link is dropped and redialled."""
    max_send_queue: int = 1048576
    """Bytes that may wait for one peer beyond what it is being sent: the agent's output
    for a client or phone stream, forwarded turns and audio for an agent. Past it a client
    is cut with ``slow_consumer``; an agent link drops audio first, then the link. Never
    less than ``max_state_size`` plus ``max_message_size``: one state change (the whole
    state) and one message must fit, or every state change would cut the client."""


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerConfig:
    default_region: str | None = None
    """ISO 3166 region for phone numbers written without ``+`` (``US``); ``None``: E.164 only."""


@dataclass(frozen=True, slots=True, kw_only=True)
class TwilioConfig:
    twilio_path: str | None = "/v1/twilio"
    """HTTP path of the Twilio Media Streams endpoint; ``None`` turns it off."""
    twilio_auth_token: tuple[str, ...] = field(default=(), repr=False)
    """Twilio auth tokens the upgrade's ``X-Twilio-Signature`` is checked against (the
    primary, and a secondary while it is rotated in); empty: not checked."""
    twilio_url: str | None = None
    """The endpoint's public URL as the TwiML writes it (``wss://voice.example.com/v1/twilio``),
    which Twilio signs; ``None``: ``wss://`` plus the request's Host and path."""
    twilio_caller_param: str = "From"
    """The ``<Stream>`` custom parameter that holds the caller's number."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    state_keys: tuple[tuple[str, bytes], ...] = field(default=(), repr=False)
    """AES-256-GCM keys that seal stored state and messages, ``ID:BASE64`` comma-separated,
    newest first (``hangon keygen`` makes one); required with ``--redis-url``. Empty: the
    embedded store seals with a random key that dies with the process."""
    caller_hash_key: bytes | None = field(default=None, repr=False)
    """Key (base64, 32-64 bytes) of the caller-key digests in storage keys and logs; required
    with ``--redis-url``, never rotated."""
    auth_keys: tuple[AuthKey, ...] = field(default=(), repr=False)
    """Each tenant's token keys (a JSON document, or the path of a file holding one); set:
    every hello needs a signed token (:mod:`gateway.core.auth`). Empty: authentication off."""
    auth_leeway: float = 30.0
    """Seconds of clock skew allowed on a token's ``exp`` and ``nbf``."""
    allowed_origins: tuple[str, ...] = ()
    """Origins (``https://app.example.com``) a browser may connect from; a WebSocket upgrade
    with another ``Origin`` gets 403. Empty: any. Upgrades without ``Origin`` (not from a
    browser) are not checked."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything ``hangon serve`` can be told."""

    server: ServerConfig = field(default_factory=ServerConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    caller: CallerConfig = field(default_factory=CallerConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    twilio: TwilioConfig = field(default_factory=TwilioConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)

    def __post_init__(self) -> None:
        s = self.store
        if not self.server.host.strip():
            raise ConfigError(
                "--host", self.server.host, "must not be empty (that means every interface)"
            )
        if not 0 <= self.server.port <= 65535:
            raise ConfigError("--port", self.server.port, "must be 0-65535")
        if not self.server.path.startswith("/"):
            raise ConfigError("--path", self.server.path, "must start with /")
        if "{" in s.key_prefix or "}" in s.key_prefix:
            raise ConfigError("--key-prefix", s.key_prefix, "must not contain { or } (hash tags)")
        if s.max_age is not None and s.max_age >= s.ttl:
            # At max_age == ttl the keys expire just as the state turns stale, and a
            # returning caller would get a plain miss instead of the stale flag.
            raise ConfigError(
                "--max-age",
                s.max_age,
                f"must be below the ttl ({s.ttl}): lower one or raise the other",
            )
        down = self.agent.downstream
        if down not in ("demo", "off") and not down.startswith(("ws://", "wss://")):
            raise ConfigError("--downstream", down, "must be a ws:// or wss:// URL, demo or off")
        if self.server.workers > 1:
            if self.server.port == 0:
                raise ConfigError("--workers", self.server.workers, "needs a fixed --port")
            if s.redis_url is None:
                raise ConfigError(
                    "--workers",
                    self.server.workers,
                    "needs --redis-url: workers do not share the memory store",
                )
        sec = self.security
        if bool(sec.state_keys) != (sec.caller_hash_key is not None):
            missing = "HANGON_CALLER_HASH_KEY" if sec.state_keys else "HANGON_STATE_KEYS"
            raise ConfigError(
                missing, "(unset)", "set both HANGON_STATE_KEYS and HANGON_CALLER_HASH_KEY"
            )
        if s.redis_url is not None and not sec.state_keys:
            raise ConfigError(
                "HANGON_STATE_KEYS",
                "(unset)",
                "required with --redis-url, as is HANGON_CALLER_HASH_KEY: nothing is stored"
                " in plaintext. 'hangon keygen' prints both",
            )
        if s.ack_replicas and s.redis_url is None:
            raise ConfigError("--ack-replicas", s.ack_replicas, "needs --redis-url")
        t = self.twilio
        if t.twilio_path is not None:
            if not t.twilio_path.startswith("/"):
                raise ConfigError("--twilio-path", t.twilio_path, "must start with /")
            if t.twilio_path == self.server.path:
                raise ConfigError("--twilio-path", t.twilio_path, "must differ from --path")
        if t.twilio_url is not None and not t.twilio_url.startswith(("wss://", "ws://")):
            raise ConfigError("--twilio-url", t.twilio_url, "must be a wss:// or ws:// URL")
        if self.limits.max_message_size < 1024:
            raise ConfigError("--max-message-size", self.limits.max_message_size, "below 1024")
        if self.limits.max_state_size < 1024:
            raise ConfigError("--max-state-size", self.limits.max_state_size, "below 1024")
        if self.limits.max_state_size > _MAX_STATE_SIZE:
            # The store scripts refuse a sealed state past 16 MiB (gateway/store/base.py).
            raise ConfigError(
                "--max-state-size", self.limits.max_state_size, "above 15 MiB (15728640)"
            )
        instance = self.server.instance_id
        if instance is not None and len(instance.encode()) > _MAX_INSTANCE_ID:
            # Written into every session it serves; the store scripts refuse a longer owner.
            raise ConfigError("--instance-id", instance, f"longer than {_MAX_INSTANCE_ID} bytes")

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Config:
        """Build a config from ``HANGON_*`` variables; others keep their defaults.

        Raises:
            ConfigError: Naming the variable and its bad value.
        """
        return from_values({o: (o.env, environ[o.env]) for o in OPTIONS if o.env in environ})

    def replace(self, group: str, **changes: Any) -> Config:
        """Return a copy with ``changes`` applied to one group."""
        new_group = dataclasses.replace(getattr(self, group), **changes)
        return dataclasses.replace(self, **{group: new_group})


def _positive(kind: Callable[[str], float]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(
                "must be a positive " + ("integer" if kind is int else "finite number")
            )
        return value

    return parse


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must not be negative")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError("must be a finite number, 0 or more")
    return value


def _region(text: str) -> str:
    region = text.strip().upper()
    if region not in phonenumbers.SUPPORTED_REGIONS:
        raise ValueError("not a region phonenumbers knows (ISO 3166 alpha-2, e.g. US)")
    return region


def _tokens(text: str) -> tuple[str, ...]:
    tokens = tuple(t.strip() for t in text.split(",") if t.strip())
    if not tokens:
        raise ValueError("needs at least one token")
    return tokens


def _hash_key(text: str) -> bytes:
    key = parse_key(text, minimum=32, exact=False)
    if len(key) > 64:
        raise ValueError("must be at most 64 bytes")
    return key


def _auth_keys(text: str) -> tuple[AuthKey, ...]:
    """A JSON document, or the path of a file holding one."""
    if not text.lstrip().startswith("{"):
        try:
            with open(text, encoding="utf-8") as f:
                text = f.read()
        except OSError as exc:
            raise ValueError(f"not JSON, and not a readable file: {exc.strerror}") from None
    return parse_auth_keys(text)


def _origins(text: str) -> tuple[str, ...]:
    if text.strip().lower() in ("", "none", "off"):
        return ()
    origins = tuple(o.strip().rstrip("/") for o in text.split(",") if o.strip())
    for origin in origins:
        if not origin.startswith(("https://", "http://")) or "/" in origin.split("://", 1)[1]:
            raise ValueError(f"{origin!r} is not an origin (scheme://host[:port])")
    return origins


def _or_none(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    def wrapped(text: str) -> Any:
        return None if text.strip().lower() in ("", "none", "off") else parse(text)

    return wrapped


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: where it lives in :class:`Config`, its flag and how to parse it."""

    group: str
    name: str
    parse: Callable[[str], Any]
    help: str
    secret: bool = False
    """Never shown: ``--help`` says only that the environment sets it."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "HANGON_" + self.name.upper()

    def default(self) -> Any:
        return getattr(getattr(Config(), self.group), self.name)


OPTIONS: tuple[Option, ...] = (
    Option("server", "host", str, "interface to listen on"),
    Option("server", "port", _non_negative_int, "TCP port for WebSocket and HTTP; 0 picks one"),
    Option("server", "path", str, "HTTP path of the WebSocket endpoint"),
    Option(
        "server",
        "backlog",
        _positive(int),
        "pending TCP connections queued by the kernel (capped by net.core.somaxconn)",
    ),
    Option(
        "server",
        "drain_period",
        _non_negative_float,
        "seconds over which SIGTERM closes clients with 1012, at random moments",
    ),
    Option(
        "server",
        "workers",
        _positive(int),
        "processes sharing the port (SO_REUSEPORT), each its own instance",
    ),
    Option(
        "server",
        "instance_id",
        _or_none(str),
        "this instance's ID in ownership records; unset: host-pid-random",
    ),
    Option(
        "store",
        "redis_url",
        _or_none(str),
        "Redis URL (redis://host:port/db, redis+cluster://host:port); unset: memory store",
    ),
    Option("store", "key_prefix", str, "prefix of every storage key"),
    Option("store", "ttl", _positive(float), "seconds a session's keys live after activity"),
    Option("store", "end_ttl", _positive(float), "seconds a session's keys live after bye"),
    Option(
        "store",
        "max_age",
        _or_none(_positive(float)),
        "seconds of inactivity after which state is stale, not resumed ('none': never)",
    ),
    Option(
        "store",
        "redis_timeout",
        _positive(float),
        "seconds to wait for a Redis reply, and for a free pooled connection",
    ),
    Option(
        "store", "redis_connect_timeout", _positive(float), "seconds to wait for a Redis connection"
    ),
    Option(
        "store",
        "retry_attempts",
        _non_negative_int,
        "retries of a store operation after a transient error",
    ),
    Option(
        "store",
        "retry_initial_delay",
        _positive(float),
        "upper bound in seconds of the first retry delay (full jitter, doubling)",
    ),
    Option("store", "retry_max_delay", _positive(float), "cap in seconds on a retry delay"),
    Option(
        "store",
        "retry_budget",
        _or_none(_positive(float)),
        "seconds after a store operation's first try past which it is not retried",
    ),
    Option(
        "store",
        "redis_max_connections",
        _positive(int),
        "Redis connections per process; operations queue for a free one",
    ),
    Option(
        "store",
        "replay_window",
        _positive(int),
        "agent messages kept per session for a client that missed them",
    ),
    Option(
        "store",
        "owner_lease",
        _positive(float),
        "seconds an instance's ownership of a session lasts unless renewed",
    ),
    Option(
        "store",
        "degrade_after",
        _or_none(_non_negative_float),
        "seconds a hello waits for an unreachable store before opening degraded ('none': never)",
    ),
    Option(
        "store",
        "ack_replicas",
        _non_negative_int,
        "replicas that must hold a write (Redis WAIT) before it is acknowledged",
    ),
    Option(
        "agent",
        "downstream",
        str,
        "voice agent: ws:// or wss:// URL, 'demo' (in-process demo agent) or 'off'",
    ),
    Option(
        "agent",
        "agent_linger",
        _non_negative_float,
        "seconds a dropped client's session keeps its agent link; agent output is stored",
    ),
    Option(
        "agent",
        "agent_open_timeout",
        _positive(float),
        "seconds to wait for the agent's WebSocket handshake",
    ),
    Option(
        "agent",
        "agent_retry_max_delay",
        _positive(float),
        "cap in seconds on the delay between redials of a dropped agent link",
    ),
    Option(
        "keepalive",
        "ping_interval",
        _or_none(_positive(float)),
        "seconds between WebSocket pings ('none' disables)",
    ),
    Option(
        "keepalive",
        "ping_timeout",
        _or_none(_positive(float)),
        "seconds to wait for a pong ('none' waits forever)",
    ),
    Option("limits", "max_message_size", _non_negative_int, "largest client frame in bytes"),
    Option(
        "limits",
        "max_state_size",
        _non_negative_int,
        "largest session state in bytes of JSON; turns growing it further are refused",
    ),
    Option(
        "twilio",
        "twilio_path",
        _or_none(str),
        "HTTP path of the Twilio Media Streams endpoint ('none' turns it off)",
    ),
    Option(
        "twilio",
        "twilio_auth_token",
        _tokens,
        "Twilio auth token(s), comma-separated, to check X-Twilio-Signature; set by env",
        secret=True,
    ),
    Option(
        "twilio",
        "twilio_url",
        _or_none(str),
        "the Twilio endpoint's public URL as in the TwiML (Twilio signs it); unset: from Host",
    ),
    Option(
        "twilio",
        "twilio_caller_param",
        str,
        "the <Stream> custom parameter that holds the caller's number",
    ),
    Option("limits", "max_restores", _positive(int), "hellos restoring at once; more wait"),
    Option(
        "limits",
        "max_turns_per_second",
        _or_none(_positive(float)),
        "turns per second one connection may send on average; more get close 4008 ('none': any)",
    ),
    Option("limits", "turn_burst", _positive(int), "turns one connection may send at once"),
    Option(
        "limits",
        "max_tenant_connections",
        _or_none(_positive(int)),
        "connections one tenant may hold on this instance; more get close 1013 ('none': any)",
    ),
    Option(
        "limits",
        "hello_timeout",
        _or_none(_positive(float)),
        "seconds a new connection has to send hello; then close 4002 ('none': forever)",
    ),
    Option(
        "limits",
        "send_timeout",
        _positive(float),
        "seconds a frame may wait for a peer to read it; then a client is cut (close 4009)",
    ),
    Option(
        "limits",
        "max_send_queue",
        _positive(int),
        "bytes that may wait for one client or agent before it is cut as not reading",
    ),
    Option(
        "limits",
        "metrics_tenants",
        _non_negative_int,
        "tenants given their own label in per-tenant metrics; the rest count as 'other'",
    ),
    Option(
        "limits",
        "restore_queue",
        _positive(int),
        "hellos waiting for a restore beyond which new ones get 1013 and a retry-after hint",
    ),
    Option(
        "security",
        "state_keys",
        parse_state_keys,
        "keys sealing stored state, ID:BASE64 comma-separated, newest first; set by env",
        secret=True,
    ),
    Option(
        "security",
        "caller_hash_key",
        _hash_key,
        "key (base64) of caller-key digests in storage keys and logs; set by env",
        secret=True,
    ),
    Option(
        "security",
        "auth_keys",
        _auth_keys,
        "tenants' token keys: JSON, or the path of a JSON file; set: hellos need a signed token",
        secret=True,
    ),
    Option(
        "security",
        "auth_leeway",
        _non_negative_float,
        "seconds of clock skew allowed on a token's exp and nbf",
    ),
    Option(
        "security",
        "allowed_origins",
        _origins,
        "origins browsers may connect from, comma-separated; others get 403 (unset: any)",
    ),
    Option(
        "caller",
        "default_region",
        _or_none(_region),
        "region (ISO 3166, e.g. US) for phone numbers without '+'; unset: E.164 only",
    ),
)
"""Every setting, in the order ``--help`` lists them."""


def _shown(option: Option, text: str) -> str:
    """What an error may repeat of a value: never a secret."""
    return "(hidden)" if option.secret else text


def from_values(values: Mapping[Option, tuple[str, str]]) -> Config:
    """Build a config from raw strings.

    Args:
        values: Per option, the label that set it (``HANGON_TTL`` or ``--ttl``)
            and its raw text.

    Raises:
        ConfigError: Naming the variable or flag that set the bad value.
    """
    groups: dict[str, dict[str, Any]] = {}
    for option, (label, text) in values.items():
        try:
            value = option.parse(text)
        except ValueError as exc:
            raise ConfigError(label, _shown(option, text), str(exc)) from None
        groups.setdefault(option.group, {})[option.name] = value
    defaults = Config()
    try:
        return Config(
            **{g: dataclasses.replace(getattr(defaults, g), **kw) for g, kw in groups.items()}
        )
    except ConfigError as exc:
        # Config's own checks name the flag; name the variable if that set the value.
        for option, (label, text) in values.items():
            if option.flag == exc.name:
                raise ConfigError(label, _shown(option, text), exc.problem) from None
        raise
