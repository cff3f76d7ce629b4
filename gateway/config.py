"""The gateway's configuration: one frozen object in groups, read from flags and ``HANGON_*``.

Each setting is written once, as a field of its group made by :func:`setting`:
its default, its ``--help`` text and its parser sit together there.
:data:`OPTIONS` is derived from those fields, and ``hangon serve --help``, the
environment variables and ``docs/configuration.md`` all follow it. Every
option ``--some-name`` has the variable ``HANGON_SOME_NAME``; a flag beats the
variable, the variable beats the default.

The help is field metadata rather than an attribute docstring, which the house
style otherwise prefers: ``--help`` has to read it at run time, and a docstring
under an assignment is gone by then. ``docs/configuration.md`` says more about
each option than its one line of help.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

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
    "setting",
]

_T = TypeVar("_T")

_MAX_STATE_SIZE = 15 << 20
"""Largest ``--max-state-size``: a sealed state of at most 16 MiB is what the store takes."""
_MAX_INSTANCE_ID = 512
"""Longest ``--instance-id`` in UTF-8 bytes: the store takes an owner of at most that."""


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


def setting(
    default: _T, help: str, parse: Callable[[str], Any] = str, *, secret: bool = False
) -> _T:
    """Declare a field of a config group: one option of ``hangon serve``.

    Args:
        default: The value when neither the flag nor the variable is set.
        help: Its line in ``--help``: what it is and its unit; the default is added there.
        parse: Turns the flag's or variable's text into the value; a ``ValueError``
            says what is wrong with the text.
        secret: Never shown: not in ``--help``, errors or the config's ``repr``; set it
            in the environment.
    """
    return field(
        default=default,
        repr=not secret,
        metadata={"help": help, "parse": parse, "secret": secret},
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class ServerConfig:
    host: str = setting("127.0.0.1", "interface to listen on")
    port: int = setting(
        8765, "TCP port for WebSocket and HTTP; 0 picks one", parse=_non_negative_int
    )
    path: str = setting("/ws", "HTTP path of the WebSocket endpoint")
    # asyncio's default of 100 overflows when a thousand callers reconnect at once,
    # and each dropped SYN costs its caller a one-second retransmit.
    backlog: int = setting(
        2048,
        "pending TCP connections queued by the kernel (capped by net.core.somaxconn)",
        parse=_positive(int),
    )
    # Each client at a random moment, so that a deploy does not set off a reconnect
    # storm of its own.
    drain_period: float = setting(
        10.0,
        "seconds over which SIGTERM closes clients with 1012, at random moments",
        parse=_non_negative_float,
    )
    workers: int = setting(
        1,
        "processes sharing the port (SO_REUSEPORT), each its own instance",
        parse=_positive(int),
    )
    instance_id: str | None = setting(
        None,
        "this instance's ID in ownership records; unset: host-pid-random",
        parse=_or_none(str),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class StoreConfig:
    redis_url: str | None = setting(
        None,
        "Redis URL (redis://host:port/db, redis+cluster://host:port); unset: memory store",
        parse=_or_none(str),
    )
    key_prefix: str = setting("hangon:", "prefix of every storage key")
    ttl: float = setting(
        3600.0, "seconds a session's keys live after activity", parse=_positive(float)
    )
    end_ttl: float = setting(
        300.0, "seconds a session's keys live after bye", parse=_positive(float)
    )
    max_age: float | None = setting(
        900.0,
        "seconds of inactivity after which state is stale, not resumed ('none': never)",
        parse=_or_none(_positive(float)),
    )
    redis_timeout: float = setting(
        2.0,
        "seconds to wait for a Redis reply, and for a free pooled connection",
        parse=_positive(float),
    )
    redis_connect_timeout: float = setting(
        2.0, "seconds to wait for a Redis connection", parse=_positive(float)
    )
    retry_attempts: int = setting(
        6, "retries of a store operation after a transient error", parse=_non_negative_int
    )
    retry_initial_delay: float = setting(
        0.05,
        "upper bound in seconds of the first retry delay (full jitter, doubling)",
        parse=_positive(float),
    )
    retry_max_delay: float = setting(1.0, "cap in seconds on a retry delay", parse=_positive(float))
    # Bounds how long a hello or turn waits before the client is told store_unavailable.
    retry_budget: float | None = setting(
        10.0,
        "seconds after a store operation's first try past which it is not retried",
        parse=_or_none(_positive(float)),
    )
    redis_max_connections: int = setting(
        64,
        "Redis connections per process; operations queue for a free one",
        parse=_positive(int),
    )
    replay_window: int = setting(
        128,
        "agent messages kept per session for a client that missed them",
        parse=_positive(int),
    )
    owner_lease: float = setting(
        60.0,
        "seconds an instance's ownership of a session lasts unless renewed",
        parse=_positive(float),
    )
    degrade_after: float | None = setting(
        2.0,
        "seconds a hello waits for an unreachable store before opening degraded ('none': never)",
        parse=_or_none(_non_negative_float),
    )
    ack_replicas: int = setting(
        0,
        "replicas that must hold a write (Redis WAIT) before it is acknowledged",
        parse=_non_negative_int,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class AgentConfig:
    downstream: str = setting(
        "demo", "voice agent: ws:// or wss:// URL, 'demo' (in-process demo agent) or 'off'"
    )
    agent_linger: float = setting(
        30.0,
        "seconds a dropped client's session keeps its agent link; agent output is stored",
        parse=_non_negative_float,
    )
    agent_open_timeout: float = setting(
        5.0, "seconds to wait for the agent's WebSocket handshake", parse=_positive(float)
    )
    agent_retry_max_delay: float = setting(
        5.0,
        "cap in seconds on the delay between redials of a dropped agent link",
        parse=_positive(float),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class KeepaliveConfig:
    ping_interval: float | None = setting(
        20.0,
        "seconds between WebSocket pings ('none' disables)",
        parse=_or_none(_positive(float)),
    )
    ping_timeout: float | None = setting(
        20.0,
        "seconds to wait for a pong ('none' waits forever)",
        parse=_or_none(_positive(float)),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitsConfig:
    max_message_size: int = setting(65536, "largest client frame in bytes", parse=_non_negative_int)
    max_state_size: int = setting(
        262144,
        "largest session state in bytes of JSON; turns growing it further are refused",
        parse=_non_negative_int,
    )
    max_restores: int = setting(128, "hellos restoring at once; more wait", parse=_positive(int))
    restore_queue: int = setting(
        20000,
        "hellos waiting for a restore beyond which new ones get 1013 and a retry-after hint",
        parse=_positive(int),
    )
    max_turns_per_second: float | None = setting(
        20.0,
        "turns per second one connection may send on average; more get close 4008 ('none': any)",
        parse=_or_none(_positive(float)),
    )
    turn_burst: int = setting(40, "turns one connection may send at once", parse=_positive(int))
    max_tenant_connections: int | None = setting(
        None,
        "connections one tenant may hold on this instance; more get close 1013 ('none': any)",
        parse=_or_none(_positive(int)),
    )
    handshake_timeout: float = setting(
        10.0,
        "seconds a new connection has to finish its WebSocket upgrade; then it is reset",
        parse=_positive(float),
    )
    hello_timeout: float | None = setting(
        10.0,
        "seconds a new connection has to send hello; then close 4002 ('none': forever)",
        parse=_or_none(_positive(float)),
    )
    send_timeout: float = setting(
        20.0,
        "seconds a frame may wait for a peer to read it; then a client is cut (close 4009)",
        parse=_positive(float),
    )
    # Taken as never less than max_state_size plus max_message_size: one state change
    # (the whole state) and one message must fit, or every state change would cut the
    # client.
    max_send_queue: int = setting(
        1048576,
        "bytes that may wait for one client or agent before it is cut as not reading",
        parse=_positive(int),
    )
    # A flood of tenant names must not blow up the metrics: the rest count as 'other'.
    metrics_tenants: int = setting(
        100,
        "tenants given their own label in per-tenant metrics; the rest count as 'other'",
        parse=_non_negative_int,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class TwilioConfig:
    twilio_path: str | None = setting(
        "/v1/twilio",
        "HTTP path of the Twilio Media Streams endpoint ('none' turns it off)",
        parse=_or_none(str),
    )
    twilio_auth_token: tuple[str, ...] = setting(
        (),
        "Twilio auth token(s), comma-separated, to check X-Twilio-Signature; set by env",
        parse=_tokens,
        secret=True,
    )
    twilio_url: str | None = setting(
        None,
        "the Twilio endpoint's public URL as in the TwiML (Twilio signs it); unset: from Host",
        parse=_or_none(str),
    )
    twilio_caller_param: str = setting(
        "From", "the <Stream> custom parameter that holds the caller's number"
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class SecurityConfig:
    state_keys: tuple[tuple[str, bytes], ...] = setting(
        (),
        "keys sealing stored state, ID:BASE64 comma-separated, newest first; set by env",
        parse=parse_state_keys,
        secret=True,
    )
    caller_hash_key: bytes | None = setting(
        None,
        "key (base64) of caller-key digests in storage keys and logs; set by env",
        parse=_hash_key,
        secret=True,
    )
    auth_keys: tuple[AuthKey, ...] = setting(
        (),
        "tenants' token keys: JSON, or the path of a JSON file; set: hellos need a signed token",
        parse=_auth_keys,
        secret=True,
    )
    auth_leeway: float = setting(
        30.0, "seconds of clock skew allowed on a token's exp and nbf", parse=_non_negative_float
    )
    allowed_origins: tuple[str, ...] = setting(
        (),
        "origins browsers may connect from, comma-separated; others get 403 (unset: any)",
        parse=_origins,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class CallerConfig:
    default_region: str | None = setting(
        None,
        "region (ISO 3166, e.g. US) for phone numbers without '+'; unset: E.164 only",
        parse=_or_none(_region),
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Config:
    """Everything ``hangon serve`` can be told."""

    # The order of the groups, and of the fields in each, is the order of ``--help``.
    server: ServerConfig = field(default_factory=ServerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    agent: AgentConfig = field(default_factory=AgentConfig)
    keepalive: KeepaliveConfig = field(default_factory=KeepaliveConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    twilio: TwilioConfig = field(default_factory=TwilioConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    caller: CallerConfig = field(default_factory=CallerConfig)

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

    def default_text(self) -> str:
        """The default as ``--help`` and ``docs/configuration.md`` write it."""
        default = self.default()
        return "none" if default is None or default == () else str(default)


def _options() -> tuple[Option, ...]:
    defaults = Config()
    options = []
    for group in dataclasses.fields(defaults):
        for f in dataclasses.fields(getattr(defaults, group.name)):
            if "parse" not in f.metadata:
                raise TypeError(f"{group.name}.{f.name} is not declared with setting()")
            meta = f.metadata
            options.append(
                Option(group.name, f.name, meta["parse"], meta["help"], secret=meta["secret"])
            )
    return tuple(options)


OPTIONS: tuple[Option, ...] = _options()
"""Every setting, from the fields of :class:`Config`'s groups, in ``--help`` order."""


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
