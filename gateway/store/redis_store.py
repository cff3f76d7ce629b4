"""The Redis store: every restore and every turn is one script call.

Scripts live in ``scripts/*.lua`` and are read once, each behind ``check.lua``: every
script checks all its arguments before its first write, and a bad one gets the reply
``hangon bad argument <name>``, which :func:`_mapped` turns into a store error that is not
retried. The store checks the same arguments before it sends them (defence in depth; see
:func:`~gateway.store.base.check_int`). Scripts run with EVALSHA;
after a ``NOSCRIPT`` (the first call, or Redis restarted) the store sends
``SCRIPT LOAD`` and EVALSHA again. Each script touches only the keys of one
session, which share a hash tag, so every script runs on Redis Cluster too:
a ``redis+cluster://`` (or ``rediss+cluster://``) URL names one node of a
cluster and selects redis-py's cluster client.

Script calls that many sessions make at the same time share round trips:
:mod:`gateway.store.pipeline` sends them together as one pipeline, and each
caller gets its own reply.

With ``ack_replicas`` set, each write (turn, agent output, bye) is followed on
the same connection, in the same round trip, by ``WAIT ack_replicas``: the
write is acknowledged only once that many replicas have it, so it survives a
failover to one of them. Without it Redis replicates asynchronously and an
acknowledged write can be lost if its primary dies before a replica has it.

Takeover notifications are Redis pub/sub messages on one channel per instance
(:func:`~gateway.store.base.owner_channel`); on a cluster, ``PUBLISH`` reaches
every node, so the subscriber may sit on any of them.

redis-py's own retries are switched off for standalone Redis:
:mod:`gateway.store.retry` retries with the gateway's backoff, and redis-py
exceptions are mapped to store errors in :func:`_mapped` alone. The cluster
client keeps its own retries, which follow ``MOVED`` redirections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.connection import HiredisRespSerializer
from redis.utils import HIREDIS_AVAILABLE

from gateway.core import codec
from gateway.core.callerkey import CallerKey
from gateway.core.resume import Outcome, plan_replay, token_digest
from gateway.core.sealing import Unsealable, aad
from gateway.core.session import RECENT_TURNS, Push, Session, SessionId, TurnWrite
from gateway.exceptions import (
    StoreConflict,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from gateway.store.base import (
    Restored,
    StoreSettings,
    Takeover,
    Written,
    bad_argument,
    check_int,
    check_push,
    check_renewal,
    check_restore,
    check_turn,
    conflict,
    owner_channel,
    session_keys,
)
from gateway.store.pipeline import AutoPipeline, RoundTrip

__all__ = ["RedisStore", "is_cluster_url"]

log = logging.getLogger("gateway.store")

_CLUSTER_SCHEMES = ("redis+cluster://", "rediss+cluster://")
_LISTEN_RETRY = 1.0
"""Seconds between attempts to subscribe again after the subscription broke."""
_POLL = 0.25
"""Seconds each read of the takeover subscription waits for a message."""


def is_cluster_url(url: str) -> bool:
    """Whether ``url`` names a Redis Cluster (``redis+cluster://`` or ``rediss+cluster://``)."""
    return url.startswith(_CLUSTER_SCHEMES)


def _script(name: str) -> str:
    """A script's source, behind the argument checks and the write fence it calls
    (``check.lua``)."""
    scripts = resources.files("gateway.store").joinpath("scripts")
    return scripts.joinpath("check.lua").read_text() + scripts.joinpath(name).read_text()


_BAD_ARGUMENT = "hangon bad argument "
"""How a script's reply to a bad argument begins (``check.lua``), after redis-py took off
the ``ERR``."""


class _mapped:
    """Turn redis-py exceptions into store errors (the only place that does).

    A class rather than a generator-based context manager: this runs around every store
    operation, and ``contextlib.contextmanager`` cost several per cent of a turn's CPU.
    """

    __slots__ = ("op",)

    def __init__(self, op: str) -> None:
        self.op = op

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        op = self.op
        if isinstance(exc, rex.TimeoutError | TimeoutError):
            raise StoreTimeout(op, str(exc) or "timed out") from exc
        if isinstance(
            exc,
            rex.ConnectionError
            | rex.ReadOnlyError
            | rex.TryAgainError
            | rex.ClusterDownError
            | rex.MaxConnectionsError
            | rex.SlotNotCoveredError
            | OSError,
        ):
            # ReadOnlyError: a failover left us talking to a replica for a moment.
            raise StoreUnavailable(op, str(exc) or type(exc).__name__) from exc
        if isinstance(exc, rex.ResponseError) and str(exc).startswith(_BAD_ARGUMENT):
            # Not retryable: a retry would carry the same argument. The script wrote nothing.
            name = str(exc)[len(_BAD_ARGUMENT) :].split(" ", 1)[0]
            raise bad_argument(op, name) from exc
        if isinstance(exc, rex.RedisError):
            raise StoreError(op, str(exc)) from exc


def _text(value: bytes) -> str:
    return value.decode()


def _msg_aad(scope: str, seq: int) -> bytes:
    return aad(scope, f"msg:{seq}")


def _conflict(op: str, reply: list[Any]) -> StoreConflict:
    status = _text(reply[0])
    return conflict(op, status, _text(reply[1]) if status == "conflict" else None)


def _written(reply: Any) -> Written:
    """A turn script's reply (or the exception in its place) as a turn's write ends."""
    if isinstance(reply, BaseException):
        with _mapped("write_turn"):
            raise reply
    status = _text(reply[0])
    if status in ("ok", "dup"):
        return Written(int(reply[1]), applied=status == "ok")
    raise _conflict("write_turn", reply)


class _HiredisPacking(AbstractConnection):
    """Packs commands with hiredis, in C, as redis-py's sync client does; its asyncio
    client packs in Python, which cost a tenth of a turn's CPU under load (a turn's
    script call carries the whole session state). Mixed into each connection class a
    URL's scheme names (:data:`_CONNECTIONS`)."""

    # redis-py 8.2 leaves its __init__ untyped; earlier releases type it.
    _packer = (
        HiredisRespSerializer()  # type: ignore[no-untyped-call, unused-ignore]
        if HIREDIS_AVAILABLE
        else None
    )

    def pack_command(self, *args: Any) -> list[bytes]:
        if self._packer is None:  # pragma: no cover - hiredis is a dependency
            return super().pack_command(*args)
        packed: list[bytes] = self._packer.pack(*args)
        return packed


class _Connection(_HiredisPacking, aioredis.Connection):
    """redis:// (TCP)."""


class _SSLConnection(_HiredisPacking, aioredis.SSLConnection):
    """rediss:// (TLS)."""


class _UnixConnection(_HiredisPacking, aioredis.UnixDomainSocketConnection):
    """unix:// (a unix socket)."""


_CONNECTIONS: dict[str, type[AbstractConnection]] = {
    "redis": _Connection,
    "rediss": _SSLConnection,
    "unix": _UnixConnection,
}
"""The connection class of each URL scheme. redis-py takes a ``connection_class`` given
to ``from_url`` over the one the scheme implies: a rediss:// URL given the TCP class
connected without TLS, and a unix:// one failed to connect."""


class RedisStore:
    """A :class:`~gateway.store.base.SessionStore` on Redis.

    Args:
        url: ``redis://``, ``rediss://``, ``redis+cluster://`` or ``rediss+cluster://`` URL.
        settings: Key prefix and lifetimes.
        socket_timeout: Seconds to wait for a reply before :class:`StoreTimeout`.
        connect_timeout: Seconds to wait for a connection.
        max_connections: Operations in flight at once (the pool size; on a cluster,
            per node). When every connection is busy an operation waits for one
            instead of failing: a reconnect storm queues in the gateway rather
            than erroring out.
        ack_replicas: Replicas that must hold a write before it is acknowledged
            (Redis ``WAIT``); 0 acknowledges once the primary has it.
        batching: Send script calls made at the same time together, one pipeline
            per round trip (see :mod:`gateway.store.pipeline`); off, each call has a
            round trip of its own. On a cluster with ``ack_replicas``, calls always
            go one by one.
        on_round_trip: Called once per pipeline or single command sent to Redis,
            with the number of script calls it carries (for metrics).
    """

    name = "redis"

    def __init__(
        self,
        url: str,
        settings: StoreSettings,
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        max_connections: int = 64,
        ack_replicas: int = 0,
        batching: bool = True,
        on_round_trip: RoundTrip | None = None,
    ) -> None:
        self.settings = settings
        self.cluster = is_cluster_url(url)
        self.client: aioredis.Redis | RedisCluster
        if self.cluster:
            self.client = RedisCluster.from_url(
                url.replace("+cluster", "", 1),
                max_connections=max_connections + 4,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
            )
        else:
            pool = aioredis.BlockingConnectionPool.from_url(
                url,
                connection_class=_CONNECTIONS.get(urlsplit(url).scheme, _Connection),
                max_connections=max_connections,
                timeout=socket_timeout,
                socket_timeout=socket_timeout,
                socket_connect_timeout=connect_timeout,
                retry=Retry(NoBackoff(), 0),
            )
            self.client = aioredis.Redis.from_pool(pool)
        self.ack_replicas = ack_replicas
        self._url = url
        self._socket_timeout = socket_timeout
        self._connect_timeout = connect_timeout
        self._scripts = AutoPipeline(
            self.client,
            ack_replicas=ack_replicas,
            # WAIT must give up before the socket read does, or a slow replica reads as
            # a dead primary.
            wait_ms=max(1, int(socket_timeout * 500)),
            timeout=socket_timeout,
            max_connections=max_connections,
            batching=batching,
            on_round_trip=on_round_trip,
        )
        self._restore = self.client.register_script(_script("restore.lua"))
        self._turn = self.client.register_script(_script("turn.lua"))
        self._end = self.client.register_script(_script("end.lua"))
        self._touch = self.client.register_script(_script("touch.lua"))
        self._push = self.client.register_script(_script("push.lua"))
        self._ops = {
            self._restore: "restore",
            self._turn: "write_turn",
            self._end: "end",
            self._touch: "touch",
            self._push: "push",
        }
        """The store operation that runs each script, as store errors name it."""
        self._ttl_ms = int(settings.ttl * 1000)
        self._end_ttl_ms = int(settings.end_ttl * 1000)
        self._lease_ms = int(settings.lease * 1000)
        self._max_age_ms = -1 if settings.max_age is None else int(settings.max_age * 1000)
        self._keyring = settings.keyring
        # The lifetimes the scripts would refuse, checked once: they never change.
        check_int("settings", "ttl_ms", self._ttl_ms, 1)
        check_int("settings", "end_ttl_ms", self._end_ttl_ms, 1)
        check_int("settings", "lease_ms", self._lease_ms)
        check_int("settings", "max_age_ms", self._max_age_ms, -1)
        check_int("settings", "window", settings.replay_window)

    def _keys(self, caller: CallerKey) -> tuple[str, str, str]:
        return session_keys(self.settings.key_prefix, caller, self._keyring)

    async def _run(self, script: AsyncScript, keys: Sequence[str], args: list[Any]) -> Any:
        """Run a script, its errors mapped to store errors (:class:`_mapped`); with
        ``ack_replicas``, a write returns once enough replicas have it."""
        # A restore or renewal lost in a failover costs a reconnect, never a turn: the
        # epoch it bumped is gone, so the next write is refused and resumes.
        durable = script is not self._restore and script is not self._touch
        with _mapped(self._ops[script]):
            return await self._scripts.run(script, keys, args, durable=durable)

    async def restore(
        self,
        caller: CallerKey,
        *,
        token: str | None,
        candidate: Session,
        now_ms: int,
        last_seq: int | None = None,
        owner: str = "",
    ) -> Restored:
        check_restore(candidate, now_ms=now_ms, last_seq=last_seq, owner=owner)
        check_int("restore", "lease_ms", now_ms + self._lease_ms)  # as restore.lua
        keys = self._keys(caller)
        keyring = self._keyring
        reply: list[Any] = await self._run(
            self._restore,
            keys,
            [
                now_ms,
                self._max_age_ms,
                self._ttl_ms,
                "" if token is None else token_digest(token),
                candidate.session_id,
                token_digest(candidate.resume_token),
                keyring.seal(codec.dumps(candidate.state), aad(keys[0], "state")),
                -1 if last_seq is None else last_seq,
                owner,
                self._lease_ms,
            ],
        )
        outcome = Outcome(_text(reply[0]))
        if outcome in (Outcome.REFUSED, Outcome.ENDED):
            return Restored(outcome, None, replayed=len(reply) > 1)
        sid, _tok, ver, state, created, updated, turns, epoch, seq, first, msgs, last, away = reply[
            1:
        ]
        recent = {_text(turns[i]): int(turns[i + 1]) for i in range(0, len(turns), 2)}
        replay = plan_replay(last_seq, seq=int(seq), first=int(first))
        try:
            opened = keyring.open(state, aad(keys[0], "state"))
            # The script returned the messages from the replay's start on.
            msgs = [
                keyring.open(m, _msg_aad(keys[0], replay.start + i)) for i, m in enumerate(msgs)
            ]
        except Unsealable as exc:
            # Not retried: a key missing here (a rotation half rolled out) may be listed on
            # another instance, where the client's next reconnect may land.
            raise StoreError("restore", f"stored session does not open: {exc}") from None
        session = Session(
            SessionId(_text(sid)),
            candidate.resume_token,  # what the welcome carries; the store holds its digest
            int(ver),
            codec.loads(opened),
            int(created),
            int(updated),
            recent,
            seq=int(seq),
            epoch=int(epoch),
            last_push=_text(last),
        )
        return Restored(outcome, session, replay, tuple(msgs), _text(away) or None)

    def write_turn(
        self, caller: CallerKey, session_id: SessionId, write: TurnWrite
    ) -> asyncio.Future[Written]:
        """See :meth:`SessionStore.write_turn`: a future, not a coroutine, so that the
        handler may start a turn's write and be answered with no task woken; every
        failure, a bad argument too, comes through the future."""
        try:
            check_turn(session_id, write)
        except StoreError as exc:
            failed: asyncio.Future[Written] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            return failed
        keys = self._keys(caller)
        return self._scripts.submit(
            self._turn,
            keys,
            [
                session_id,
                write.base_version,
                write.version,
                self._keyring.seal(write.encoded, aad(keys[0], "state")),
                write.turn_id,
                write.at_ms,
                self._ttl_ms,
                RECENT_TURNS,
                write.epoch,
                write.write_id,
            ],
            durable=True,
            then=_written,
        )

    async def push(self, caller: CallerKey, session_id: SessionId, push: Push) -> None:
        check_push(session_id, push)
        keys = self._keys(caller)
        keyring = self._keyring
        sealed = [
            keyring.seal(data, _msg_aad(keys[0], push.base_seq + 1 + i))
            for i, data in enumerate(push.messages)
        ]
        reply: list[Any] = await self._run(
            self._push,
            keys,
            [
                session_id,
                push.epoch,
                push.base_version,
                push.version,
                b"" if push.encoded is None else keyring.seal(push.encoded, aad(keys[0], "state")),
                push.base_seq,
                push.acked_seq,
                self.settings.replay_window,
                push.at_ms,
                self._ttl_ms,
                push.push_id,
                *sealed,
            ],
        )
        status = _text(reply[0])
        if status != "ok":
            raise _conflict("push", reply)

    async def end(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int
    ) -> None:
        check_renewal("end", session_id, now_ms=now_ms, epoch=epoch)
        done = await self._run(
            self._end, self._keys(caller), [session_id, now_ms, self._end_ttl_ms, epoch]
        )
        if done == -1:
            raise conflict("end", "superseded")

    async def touch(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int, owner: str
    ) -> None:
        check_renewal("touch", session_id, now_ms=now_ms, epoch=epoch, owner=owner)
        check_int("touch", "lease_ms", now_ms + self._lease_ms)  # as touch.lua
        done = await self._run(
            self._touch,
            self._keys(caller),
            [session_id, now_ms, self._ttl_ms, epoch, owner, self._lease_ms],
        )
        if done == -1:
            raise conflict("touch", "superseded")

    async def notify(self, owner: str, session_id: SessionId, epoch: int) -> None:
        with _mapped("notify"):
            self._scripts.count(0)
            await self.client.publish(
                owner_channel(self.settings.key_prefix, owner), f"{session_id} {epoch}"
            )

    async def listen(self, owner: str, on_takeover: Takeover) -> None:
        channel = owner_channel(self.settings.key_prefix, owner)
        me = asyncio.current_task()
        while True:
            own: aioredis.Redis | None = None
            pubsub: Any = None
            reading: asyncio.Future[Any] | None = None
            try:
                if isinstance(self.client, RedisCluster):
                    # Its pub/sub picks a node from the slot map, which loads on first use.
                    await self.client.initialize()
                    pubsub = self.client.pubsub(ignore_subscribe_messages=True)
                else:
                    # A connection of its own, not one of the operations' pool.
                    own = aioredis.Redis.from_url(
                        self._url,
                        socket_connect_timeout=self._connect_timeout,
                        socket_timeout=self._socket_timeout,
                    )
                    pubsub = own.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(channel)
                while True:
                    if me is not None and me.cancelling():
                        # redis-py may swallow a cancellation that lands mid-connect.
                        raise asyncio.CancelledError
                    # Cancelling redis-py mid-read can leave the read hanging; let each short
                    # read finish on its own instead (below, on the way out).
                    reading = asyncio.ensure_future(pubsub.get_message(timeout=_POLL))
                    message = await asyncio.shield(reading)
                    if message is None:
                        continue
                    sid, _, epoch = _text(message["data"]).partition(" ")
                    on_takeover(SessionId(sid), int(epoch))
            except (rex.RedisError, OSError, ValueError) as exc:
                log.warning("takeover subscription lost channel=%s error=%s", channel, exc)
            finally:
                if reading is not None and not reading.done():
                    await asyncio.wait({reading}, timeout=_POLL + 1)
                # Closing a pub/sub whose connection broke must not stop the listener.
                if pubsub is not None:
                    with contextlib.suppress(rex.RedisError, OSError):
                        await pubsub.aclose()
                if own is not None:
                    with contextlib.suppress(rex.RedisError, OSError):
                        await own.aclose()
            await asyncio.sleep(_LISTEN_RETRY)

    async def ping(self) -> None:
        with _mapped("ping"):
            self._scripts.count(0)
            await self.client.ping()

    async def aclose(self) -> None:
        await self._scripts.aclose()
        await self.client.aclose()
