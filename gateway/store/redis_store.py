"""The Redis store: every restore and every turn is one script call, one round trip.

Scripts live in ``scripts/*.lua`` and are read once. redis-py runs them with
EVALSHA; after a ``NOSCRIPT`` (the first call, or Redis restarted) it sends
``SCRIPT LOAD`` and EVALSHA again. Each script touches only the keys of one
session, which share a hash tag, so the scripts are ready for Redis Cluster;
this client is the standalone one.

redis-py's own retries are switched off: :mod:`gateway.store.retry` retries
with the gateway's backoff, and redis-py exceptions are mapped to store errors
in :func:`_mapped` alone.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from gateway.core import codec
from gateway.core.callerkey import CallerKey
from gateway.core.resume import Outcome, plan_replay
from gateway.core.session import RECENT_TURNS, Push, ResumeToken, Session, SessionId, TurnWrite
from gateway.exceptions import (
    StoreConflict,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)
from gateway.store.base import Restored, StoreSettings, Written, conflict, session_keys

__all__ = ["RedisStore"]


def _script(name: str) -> str:
    return resources.files("gateway.store").joinpath("scripts", name).read_text()


@contextmanager
def _mapped(op: str) -> Iterator[None]:
    """Turn redis-py exceptions into store errors (the only place that does)."""
    try:
        yield
    except (rex.TimeoutError, TimeoutError) as exc:
        raise StoreTimeout(op, str(exc) or "timed out") from exc
    except (rex.ConnectionError, rex.ReadOnlyError, rex.TryAgainError, OSError) as exc:
        # ReadOnlyError: a failover left us talking to a replica for a moment.
        raise StoreUnavailable(op, str(exc) or type(exc).__name__) from exc
    except rex.RedisError as exc:
        raise StoreError(op, str(exc)) from exc


def _text(value: bytes) -> str:
    return value.decode()


def _conflict(op: str, reply: list[Any]) -> StoreConflict:
    status = _text(reply[0])
    return conflict(op, status, _text(reply[1]) if status == "conflict" else None)


class RedisStore:
    """A :class:`~gateway.store.base.SessionStore` on Redis.

    Args:
        url: ``redis://`` or ``rediss://`` URL.
        settings: Key prefix and lifetimes.
        socket_timeout: Seconds to wait for a reply before :class:`StoreTimeout`.
        connect_timeout: Seconds to wait for a connection.
        max_connections: Size of the connection pool. When every connection is busy
            an operation waits for one (up to ``socket_timeout``) instead of failing:
            a reconnect storm queues in the gateway rather than erroring out.
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
    ) -> None:
        self.settings = settings
        pool = aioredis.BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=socket_timeout,
            socket_timeout=socket_timeout,
            socket_connect_timeout=connect_timeout,
            retry=Retry(NoBackoff(), 0),
        )
        self.client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        self._restore = self.client.register_script(_script("restore.lua"))
        self._turn = self.client.register_script(_script("turn.lua"))
        self._end = self.client.register_script(_script("end.lua"))
        self._touch = self.client.register_script(_script("touch.lua"))
        self._push = self.client.register_script(_script("push.lua"))
        self._ttl_ms = int(settings.ttl * 1000)

    async def restore(
        self,
        caller: CallerKey,
        *,
        token: str | None,
        candidate: Session,
        now_ms: int,
        last_seq: int | None = None,
    ) -> Restored:
        max_age = self.settings.max_age
        with _mapped("restore"):
            reply: list[Any] = await self._restore(
                keys=session_keys(self.settings.key_prefix, caller),
                args=[
                    now_ms,
                    -1 if max_age is None else int(max_age * 1000),
                    self._ttl_ms,
                    token or "",
                    candidate.session_id,
                    candidate.resume_token,
                    codec.dumps(candidate.state),
                    -1 if last_seq is None else last_seq,
                ],
            )
        outcome = Outcome(_text(reply[0]))
        if len(reply) == 1:
            return Restored(outcome, None)
        sid, tok, ver, state, created, updated, turns, epoch, seq, first, msgs, last = reply[1:]
        recent = {_text(turns[i]): int(turns[i + 1]) for i in range(0, len(turns), 2)}
        session = Session(
            SessionId(_text(sid)),
            ResumeToken(_text(tok)),
            int(ver),
            codec.loads(state),
            int(created),
            int(updated),
            recent,
            seq=int(seq),
            epoch=int(epoch),
            last_push=_text(last),
        )
        replay = plan_replay(last_seq, seq=session.seq, first=int(first))
        return Restored(outcome, session, replay, tuple(msgs))

    async def write_turn(
        self, caller: CallerKey, session_id: SessionId, write: TurnWrite
    ) -> Written:
        with _mapped("write_turn"):
            reply: list[Any] = await self._turn(
                keys=session_keys(self.settings.key_prefix, caller),
                args=[
                    session_id,
                    write.base_version,
                    write.version,
                    write.encoded,
                    write.turn_id,
                    write.at_ms,
                    self._ttl_ms,
                    RECENT_TURNS,
                    write.epoch,
                ],
            )
        status = _text(reply[0])
        if status in ("ok", "dup"):
            return Written(int(reply[1]), applied=status == "ok")
        raise _conflict("write_turn", reply)

    async def push(self, caller: CallerKey, session_id: SessionId, push: Push) -> None:
        with _mapped("push"):
            reply: list[Any] = await self._push(
                keys=session_keys(self.settings.key_prefix, caller),
                args=[
                    session_id,
                    push.epoch,
                    push.base_version,
                    push.version,
                    push.encoded or b"",
                    push.base_seq,
                    push.acked_seq,
                    self.settings.replay_window,
                    push.at_ms,
                    self._ttl_ms,
                    push.push_id,
                    *push.messages,
                ],
            )
        status = _text(reply[0])
        if status != "ok":
            raise _conflict("push", reply)

    async def end(
        self, caller: CallerKey, session_id: SessionId, now_ms: int, *, epoch: int
    ) -> None:
        with _mapped("end"):
            done = await self._end(
                keys=session_keys(self.settings.key_prefix, caller),
                args=[session_id, now_ms, int(self.settings.end_ttl * 1000), epoch],
            )
        if done == -1:
            raise conflict("end", "superseded")

    async def touch(self, caller: CallerKey, session_id: SessionId, now_ms: int) -> None:
        with _mapped("touch"):
            await self._touch(
                keys=session_keys(self.settings.key_prefix, caller),
                args=[session_id, now_ms, self._ttl_ms],
            )

    async def ping(self) -> None:
        with _mapped("ping"):
            await self.client.ping()

    async def aclose(self) -> None:
        await self.client.aclose()
