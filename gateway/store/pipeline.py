"""How script calls reach Redis: many sessions' calls share one round trip.

Theory of operation. Every store operation is one script call. Calls wait in
one queue, and at most a few sender tasks (``_PIPELINES``) run. A sender takes
everything queued, up to ``_BATCH`` calls, sends it as one non-transactional
pipeline of ``EVALSHA`` commands, and hands each caller its own reply or its
own exception; then it takes what queued meanwhile, or ends. A lone call finds
no sender busy and goes out at once: no timer holds it back. Under load, calls
queue while the pipelines in flight are out, and the next round trip carries
them all, so batches grow with the load by themselves.

- A script error (or a refusal the script returns) belongs to its own call: the
  other calls of the pipeline get their replies.
- ``NOSCRIPT`` (Redis restarted, or ``SCRIPT FLUSH``): the scripts missing are
  loaded, and only the calls that got it are sent again, in a pipeline of their
  own, up to ``_PASSES`` times in all.
- With ``ack_replicas``, a pipeline that carries a write ends with one ``WAIT``.
  ``WAIT`` counts the writes of its own connection, which are the pipeline's:
  every write in it is acknowledged only if enough replicas confirmed, and all
  of them fail as unavailable otherwise (the caller retries; the scripts
  recognise a write that landed). Restores and touches share the pipeline but
  not the verdict.
- A broken connection or a timeout fails every call of the pipeline with that
  error, mapped by the caller like any other. On a standalone Redis the store's
  timeout bounds the whole round trip (:meth:`AutoPipeline._execute`), not each
  reply. Calls whose reply had already arrived fail too; their retries are safe
  because every script is idempotent on retry (turn IDs, push IDs).
- A caller cancelled while its call waits in the queue is skipped; one cancelled
  while its call is out only stops waiting. Senders are tasks of their own, so a
  caller's cancellation never reaches redis-py, where Python 3.11's
  ``asyncio.wait_for`` may swallow it.
- A call queued longer than the store's timeout fails as unavailable, as a wait
  for a free pooled connection does, so each try stays bounded.

On a Redis Cluster, redis-py's cluster pipeline splits a batch by node: one
round trip per node, in parallel, and it follows ``MOVED`` and ``ASK`` for the
commands that got them, one by one. With ``ack_replicas`` on a cluster, each
call still goes alone, with its ``WAIT`` on its node (:meth:`AutoPipeline.one`),
because a command the cluster pipeline redirects would leave its ``WAIT``
answering for the node it left.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import hiredis
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.cluster import RedisCluster
from redis.commands.core import AsyncScript

__all__ = ["AutoPipeline", "RoundTrip"]

log = logging.getLogger("gateway.store")


def _hiredis_reading() -> tuple[type[Any], object] | None:
    """redis-py's asyncio hiredis parser, and what its reader gives when a reply is not
    all in yet, for reading a pipeline's replies from the reader itself (:func:`_replies`)."""
    try:
        from redis._parsers.hiredis import NOT_ENOUGH_DATA, _AsyncHiredisParser
    except ImportError:  # pragma: no cover - a redis-py laid out otherwise
        return None
    return _AsyncHiredisParser, NOT_ENOUGH_DATA


_HIREDIS = _hiredis_reading()

_PIPELINES = 4
"""Pipelines in flight at once (fewer if the pool is smaller)."""
_BATCH = 256
"""Script calls in one pipeline at most."""
_PASSES = 4
"""Sends of one call at most, counting resends after ``NOSCRIPT`` or ``MOVED``."""

T = TypeVar("T")

RoundTrip = Callable[[int], None]
"""Called once per pipeline or single command sent to Redis, with the number of script
calls it carries (0 for ``SCRIPT LOAD``, ``PUBLISH``, ``PING``)."""


@dataclass(slots=True, eq=False)
class _Call:
    script: AsyncScript
    keys: Sequence[str]
    args: Sequence[Any]
    durable: bool
    """Needs ``WAIT`` (a write, with ``ack_replicas``)."""
    future: asyncio.Future[Any]
    queued: float
    """Event loop time when it was queued."""
    then: Callable[[Any], Any] | None = None
    """Makes the caller's result of its reply, or of the exception in the reply's place
    (see :meth:`AutoPipeline.submit`)."""

    def evalsha(self) -> tuple[Any, ...]:
        return ("EVALSHA", self.script.sha, len(self.keys), *self.keys, *self.args)


def _own(exc: BaseException) -> BaseException:
    """A copy of ``exc`` for one caller: one exception object raised in many tasks would
    chain all their tracebacks together."""
    try:
        return copy.copy(exc)
    except Exception:  # pragma: no cover - every redis-py exception copies
        return exc


def _settle(call: _Call, reply: Any) -> None:
    future = call.future
    if future.done():
        return  # its caller was cancelled
    then = call.then
    if then is not None:
        try:
            reply = then(reply)
        except Exception as exc:
            reply = exc
    if isinstance(reply, BaseException):
        future.set_exception(reply)
    else:
        future.set_result(reply)


def _fail(calls: Iterable[_Call], exc: BaseException) -> None:
    for call in calls:
        _settle(call, _own(exc))


async def _replies(conn: aioredis.Connection, count: int) -> list[Any]:
    """Read ``count`` replies from ``conn``; a reply that is an error takes its place.

    Straight from the hiredis reader of redis-py's parser when the connection has one, as
    that parser's ``read_response`` loop does (push messages handed to it, a connection
    error raised): redis-py's ``Connection.read_response`` around it costs four coroutine
    calls, a host string and a health-check time per reply, 1.4 us against 0.5 us read
    this way (``timeit``, 250 replies a round trip). Any other parser: ``read_response``.
    """
    parser: Any = getattr(conn, "_parser", None)
    reader = getattr(parser, "_reader", None)
    if _HIREDIS is None or type(parser) is not _HIREDIS[0] or reader is None:
        return await _read_responses(conn, count)
    more = _HIREDIS[1]
    push = getattr(parser, "_hiredis_PushNotificationType", None)
    replies: list[Any] = []
    try:
        while len(replies) < count:
            reply = reader.gets()
            if reply is more:
                await parser.read_from_socket()
            elif push is not None and isinstance(reply, push):
                await parser.handle_push_response(reply)  # RESP3: not a reply
            elif isinstance(reply, rex.ConnectionError):
                raise reply  # LOADING and the like: the whole round trip fails
            elif isinstance(reply, list) and reply and isinstance(reply[0], rex.ConnectionError):
                raise reply[0]
            else:
                replies.append(reply)
    except OSError as exc:
        # As redis-py's read_response does (a unix socket's connection has no host).
        raise rex.ConnectionError(f"Error while reading from Redis: {exc}") from exc
    return replies


async def _read_responses(conn: aioredis.Connection, count: int) -> list[Any]:
    replies: list[Any] = []
    for _ in range(count):
        try:
            # math.inf: no deadline per reply; the round trip's bounds them all.
            replies.append(await conn.read_response(timeout=math.inf))
        except rex.ResponseError as exc:
            replies.append(exc)
    return replies


class AutoPipeline:
    """Runs script calls, sending concurrent ones together.

    Args:
        client: The standalone or cluster client.
        ack_replicas: Replicas that must confirm each write (``WAIT``); 0 for none.
        wait_ms: The ``WAIT`` timeout, in milliseconds.
        timeout: Seconds a call may wait in the queue (and, on a cluster without
            batching, for a place among ``max_connections``).
        max_connections: Connections the client may use (per node on a cluster).
        batching: Send concurrent calls together; off, each call has a round trip
            of its own, as before auto-pipelining.
        on_round_trip: Counts round trips (see :data:`RoundTrip`).
    """

    def __init__(
        self,
        client: aioredis.Redis | RedisCluster,
        *,
        ack_replicas: int,
        wait_ms: int,
        timeout: float,
        max_connections: int,
        batching: bool = True,
        on_round_trip: RoundTrip | None = None,
    ) -> None:
        self.client = client
        self.ack_replicas = ack_replicas
        cluster = isinstance(client, RedisCluster)
        self.batching = batching and not (cluster and ack_replicas)
        """Whether calls are sent together (never on a cluster with ``ack_replicas``)."""
        self._wait = ("WAIT", ack_replicas, wait_ms)
        self._wait_ms = wait_ms
        self._timeout = timeout
        self._on_round_trip = on_round_trip
        self._pipelines = max(1, min(_PIPELINES, max_connections))
        # The cluster client fails, rather than waits, when a node's connections are all
        # busy; the semaphore makes single calls wait their turn instead. Batches need
        # none: there are at most _PIPELINES of them, each with one connection per node.
        self._slots = asyncio.Semaphore(max_connections) if cluster else None
        self._queue: collections.deque[_Call] = collections.deque()
        self._senders: set[asyncio.Task[None]] = set()
        self._fresh: set[asyncio.Task[None]] = set()
        """Senders that have not looked at the queue yet: one of them will take a new call."""
        self._closing = False

    def count(self, ops: int) -> None:
        """Count one round trip carrying ``ops`` script calls."""
        if self._on_round_trip is not None:
            self._on_round_trip(ops)

    async def run(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *, durable: bool
    ) -> Any:
        """Run ``script`` and return its reply.

        Args:
            durable: A write: with ``ack_replicas``, it returns only once that many
                replicas confirmed it.

        Raises:
            redis.exceptions.RedisError: Its own script error, or its pipeline's
                connection error or timeout, for the caller to map.
        """
        durable = durable and self.ack_replicas > 0
        if self._closing:
            raise rex.ConnectionError("store closing")
        if not self.batching:
            return await self.one(script, keys, args, durable=durable)
        # Cancelling this await cancels the future: a sender then skips or ignores it.
        return await self._queued(script, keys, args, durable, None)

    def submit(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        *,
        durable: bool,
        then: Callable[[Any], T],
    ) -> asyncio.Future[T]:
        """Start ``script`` without a coroutine; the future of ``then`` of its reply.

        ``then`` gets the reply, or the exception :meth:`run` would raise in its place,
        and runs as the call is settled: its result is the future's, and its exception
        fails the future. A caller with a callback on the future is answered with no task
        woken (a turn's write, :class:`~gateway.transport.client_ws.Handler`).
        """
        if self._closing or not self.batching:
            return asyncio.ensure_future(self._then(script, keys, args, durable, then))
        return self._queued(script, keys, args, durable and self.ack_replicas > 0, then)

    def _queued(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        durable: bool,
        then: Callable[[Any], Any] | None,
    ) -> asyncio.Future[Any]:
        """Queue a call for the next pipeline; its future."""
        loop = asyncio.get_running_loop()
        call = _Call(script, keys, args, durable, loop.create_future(), loop.time(), then)
        self._queue.append(call)
        self._wake()
        return call.future

    async def _then(
        self,
        script: AsyncScript,
        keys: Sequence[str],
        args: Sequence[Any],
        durable: bool,
        then: Callable[[Any], T],
    ) -> T:
        try:
            reply = await self.run(script, keys, args, durable=durable)
        except Exception as exc:
            reply = exc
        return then(reply)

    def _wake(self) -> None:
        """Start a sender for the queued calls, unless one is about to look or none is free."""
        if self._queue and not self._fresh and len(self._senders) < self._pipelines:
            task = asyncio.get_running_loop().create_task(self._send())
            self._senders.add(task)
            self._fresh.add(task)
            task.add_done_callback(self._senders.discard)
            task.add_done_callback(self._fresh.discard)

    async def _send(self) -> None:
        me = asyncio.current_task()
        if me is not None:
            self._fresh.discard(me)
        try:
            while self._queue and not self._closing:
                calls = self._take()
                self._wake()  # more than one batch queued: another pipeline takes the rest
                try:
                    await self._batch(calls)
                except asyncio.CancelledError:
                    _fail(calls, rex.ConnectionError("store closed"))
                    raise
                except Exception as exc:
                    _fail(calls, exc)
        finally:
            # Leave the set now, not in a done callback a loop step later: a call queued
            # in between would find every place taken and no sender coming for it.
            if me is not None:
                self._senders.discard(me)
            if self._queue and not self._closing:
                self._wake()

    def _take(self) -> list[_Call]:
        now = asyncio.get_running_loop().time()
        calls: list[_Call] = []
        while self._queue and len(calls) < _BATCH:
            call = self._queue.popleft()
            if call.future.done():
                continue  # its caller gave up while it waited
            if now - call.queued > self._timeout:
                _settle(call, rex.ConnectionError(f"no round trip free within {self._timeout} s"))
                continue
            calls.append(call)
        return calls

    async def _batch(self, calls: list[_Call]) -> None:
        for _ in range(_PASSES):
            calls = [call for call in calls if not call.future.done()]
            if not calls:
                return
            calls = await self._pass(calls)
            if not calls:
                return
        _fail(calls, rex.TryAgainError("script or slot moved under every try"))

    async def _pass(self, calls: list[_Call]) -> list[_Call]:
        """Send ``calls`` in one pipeline, settle them, and return those to send again."""
        wait = any(call.durable for call in calls)  # only on a standalone Redis
        if isinstance(self.client, RedisCluster):
            cpipe = self.client.pipeline(transaction=False)
            for call in calls:
                cpipe.execute_command(*call.evalsha())
            self._count_nodes(calls)
            # One pipeline per node, in parallel; MOVED, ASK and TRYAGAIN are followed
            # for each command that got one, by the cluster client's own retries.
            replies = await cpipe.execute(raise_on_error=False)
        else:
            commands = [call.evalsha() for call in calls]
            if wait:
                commands.append(self._wait)
            self.count(len(calls))
            replies = await self._execute(self.client, commands)
        acked = replies.pop() if wait else None
        again: list[_Call] = []
        for call, reply in zip(calls, replies, strict=True):
            if isinstance(reply, rex.NoScriptError):
                again.append(call)
            elif isinstance(reply, Exception) or not call.durable:
                _settle(call, reply)
            else:
                _settle(call, self._vouched(reply, acked))
        if again:
            await self._load(call.script for call in again)
        return again

    async def _execute(self, client: aioredis.Redis, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send ``commands`` on one pooled connection as one write and read every reply; a
        reply that is an error takes its command's place in the list.

        What redis-py's pipeline does for a batch, without what a batch of script calls
        does not need (a command stack, reply callbacks, its retries, which are off
        anyway) and with one deadline for the whole round trip instead of one per reply.
        Going without them cut the gateway's CPU per turn by about a tenth under load. The
        replies are read from hiredis's reader itself where redis-py has one (:func:`_replies`).
        """
        pool = client.connection_pool
        task = asyncio.current_task()
        cancels = task.cancelling() if task is not None else 0
        conn: aioredis.Connection = await pool.get_connection()  # type: ignore[no-untyped-call]
        try:
            async with asyncio.timeout(self._timeout):
                # hiredis packs each command in C; these hold only str, bytes and int.
                packed = b"".join([hiredis.pack_command(command) for command in commands])
                await conn.send_packed_command(packed, check_health=False)
                if task is not None and task.cancelling() > cancels:
                    # The write (or connect) runs in asyncio.wait_for, which on Python 3.11
                    # swallows a cancellation that lands as it completes: the deadline's,
                    # here. The reads below have no deadline of their own.
                    raise asyncio.CancelledError
                return await _replies(conn, len(commands))
        except BaseException as exc:
            # Replies may be left unread: the connection must not be used again.
            await conn.disconnect(nowait=True)
            if isinstance(exc, TimeoutError):
                raise rex.TimeoutError(f"no reply within {self._timeout} s") from None
            raise
        finally:
            await pool.release(conn)

    def _vouched(self, reply: Any, acked: Any) -> Any:
        """A write's reply if ``WAIT`` answered ``acked`` with enough replicas, else the error."""
        if isinstance(acked, BaseException):
            return _own(acked)
        if int(acked) < self.ack_replicas:
            # Retried as unavailable; the scripts answer a retry of a write that landed
            # as applied and write again, so the next WAIT covers it.
            return rex.ConnectionError(
                f"{acked} of {self.ack_replicas} replicas acknowledged the write"
                f" within {self._wait_ms} ms"
            )
        return reply

    def _count_nodes(self, calls: list[_Call]) -> None:
        """Count a cluster pipeline: one round trip per node it went to."""
        assert isinstance(self.client, RedisCluster)
        per_node: collections.Counter[str] = collections.Counter()
        try:
            for call in calls:
                node = self.client.get_node_from_key(call.keys[0])
                per_node[node.name if node is not None else ""] += 1
        except (rex.RedisError, rex.RedisClusterException):
            per_node = collections.Counter({"": len(calls)})  # slot map unknown
        for ops in per_node.values():
            self.count(ops)

    async def _load(self, scripts: Iterable[AsyncScript]) -> None:
        for script in {s.sha: s for s in scripts}.values():
            self.count(0)
            await self.client.script_load(script.script)

    async def one(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], *, durable: bool
    ) -> Any:
        """Run ``script`` in a round trip of its own; see :meth:`run`."""
        if self._slots is None:
            return await self._one(script, keys, args, durable)
        # Bounded like the standalone pool's wait for a connection.
        async with asyncio.timeout(self._timeout):
            await self._slots.acquire()
        try:
            return await self._one(script, keys, args, durable)
        finally:
            self._slots.release()

    async def _one(
        self, script: AsyncScript, keys: Sequence[str], args: Sequence[Any], durable: bool
    ) -> Any:
        evalsha = ("EVALSHA", script.sha, len(keys), *keys, *args)
        for _ in range(_PASSES):
            if not durable:
                # A restore or renewal lost in a failover costs a reconnect, never a
                # turn: the epoch it bumped is gone, so the next write is refused.
                self.count(1)
                try:
                    return await self.client.evalsha(script.sha, len(keys), *keys, *args)
                except rex.NoScriptError:
                    await self._load([script])
                continue
            self.count(1)
            if isinstance(self.client, RedisCluster):
                # WAIT counts the writes of its own connection: send it to the node that
                # holds the keys, where the pipeline uses the script's connection. No
                # redirection: a script redirected alone would be vouched for by the WAIT
                # of the node it left. (execute_command("EVALSHA"): the cluster pipeline
                # blocks its evalsha() method.)
                cpipe = self.client.pipeline(transaction=False)
                cpipe.execute_command(*evalsha)
                node = self.client.get_node_from_key(keys[0])
                cpipe.execute_command(*self._wait, target_nodes=node)
                reply, acked = await cpipe.execute(raise_on_error=False, allow_redirections=False)
            else:
                pipe = self.client.pipeline(transaction=False)
                pipe.execute_command(*evalsha)
                pipe.execute_command(*self._wait)
                reply, acked = await pipe.execute(raise_on_error=False)
            if isinstance(reply, rex.NoScriptError):
                await self._load([script])
                continue
            if isinstance(reply, rex.MovedError) and isinstance(self.client, RedisCluster):
                # The slot moved (failover, resharding): learn where, and send both again.
                await self.client.nodes_manager.move_slot(reply)
                continue
            if isinstance(reply, rex.AskError):
                raise rex.TryAgainError("slot migrating; try again")
            if isinstance(reply, Exception):
                raise reply
            result = self._vouched(reply, acked)
            if isinstance(result, BaseException):
                raise result
            return result
        raise rex.TryAgainError("script or slot moved under every try")

    async def aclose(self) -> None:
        """Let the pipelines in flight finish (cancel them past the timeout); fail queued calls.

        Calls made during the close fail as unavailable; later ones are served again.
        """
        self._closing = True
        try:
            senders = set(self._senders)
            if senders:
                _, pending = await asyncio.wait(senders, timeout=self._timeout)
                for task in pending:
                    task.cancel()
                if pending:
                    # On Python 3.11, asyncio.wait_for inside redis-py can swallow a
                    # cancellation; a sender that missed its own must not hold up the exit.
                    _, pending = await asyncio.wait(pending, timeout=self._timeout)
                    if pending:
                        log.warning("store close: %d pipelines did not stop", len(pending))
        finally:
            _fail(self._queue, rex.ConnectionError("store closed"))
            self._queue.clear()
            self._closing = False
