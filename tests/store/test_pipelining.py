"""Auto-pipelining: concurrent script calls share round trips to a real Redis, and each caller
still gets its own reply, its own error, and its own durable write."""

from __future__ import annotations

import asyncio
import math
import signal
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
import redis.exceptions as rex

from gateway.config import Config
from gateway.core.callerkey import CallerKey
from gateway.core.session import Session
from gateway.exceptions import StoreConflict, StoreError, StoreTimeout, StoreUnavailable
from gateway.metrics import Metrics
from gateway.server import Gateway
from gateway.store import pipeline
from gateway.store.base import StoreSettings
from gateway.store.pipeline import AutoPipeline
from gateway.store.redis_store import RedisStore, _Connection
from tests.support.records import T0, candidate, write
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer

SESSIONS = 1000

# Keeps Redis busy for about ``ARGV[1]`` ms, so that what is sent meanwhile waits for
# its replies: a pipeline caught in flight.
BUSY = """
local t = redis.call('TIME')
local start = t[1] * 1000000 + t[2]
while true do
  local n = redis.call('TIME')
  if n[1] * 1000000 + n[2] - start > tonumber(ARGV[1]) * 1000 then return 1 end
end
"""


class Trips:
    """Records every round trip a store reports, with the script calls it carried."""

    def __init__(self) -> None:
        self.ops: list[int] = []

    def __call__(self, ops: int) -> None:
        self.ops.append(ops)

    @property
    def count(self) -> int:
        return len(self.ops)

    def reset(self) -> None:
        self.ops.clear()


def callers(n: int, tag: str = "p") -> list[CallerKey]:
    return [CallerKey("acme", "user", f"{tag}{i}", "c") for i in range(n)]


async def restored(store: RedisStore, keys: list[CallerKey]) -> list[Session]:
    results = await asyncio.gather(
        *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in keys)
    )
    sessions = [r.session for r in results]
    assert all(s is not None for s in sessions)
    return [s for s in sessions if s is not None]


def busy(url: str, ms: int, started: threading.Event) -> threading.Thread:
    """Block the Redis at ``url`` for ``ms`` milliseconds, from a thread of its own."""

    def run() -> None:
        client = redis.Redis.from_url(url, socket_timeout=10)
        started.set()
        try:
            client.eval(BUSY, 0, ms)
        except rex.RedisError:
            pass  # the server was killed under it
        finally:
            client.close()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def trips() -> Trips:
    return Trips()


@pytest.fixture(params=["hiredis reader", "redis-py"])
def reading(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a pipeline's replies are read: from redis-py's hiredis reader, as with the
    redis-py this project installs, or through redis-py's ``read_response``, as with a
    parser or a protocol the reader path does not know."""
    if request.param == "redis-py":
        monkeypatch.setattr(pipeline, "_HIREDIS", None)
    return str(request.param)


@pytest.fixture
async def store(redis_url: str, settings: StoreSettings, trips: Trips) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, settings, on_round_trip=trips)
    yield s
    await s.aclose()


@pytest.fixture
def cluster_url(request: pytest.FixtureRequest) -> Iterator[str]:
    cluster: RedisCluster = request.getfixturevalue("redis_cluster")
    yield cluster.url


async def storm(store: RedisStore, trips: Trips, n: int) -> None:
    keys = callers(n)
    sessions = await restored(store, keys)
    assert trips.count <= 0.2 * n
    trips.reset()
    writes = [write(s, "t1", T0 + 1, name=f"n{i}") for i, s in enumerate(sessions)]
    results = await asyncio.gather(
        *(
            store.write_turn(c, s.session_id, w)
            for c, s, w in zip(keys, sessions, writes, strict=True)
        )
    )
    assert all(r.applied and r.version == 1 for r in results)
    assert trips.count <= 0.2 * n, trips.ops
    # Each caller's own write landed in its own session.
    back = await restored(store, keys)
    assert [s.state["form_answers"] for s in back] == [{"name": f"n{i}"} for i in range(n)]


async def test_storm_takes_few_round_trips(store: RedisStore, trips: Trips) -> None:
    """A thousand concurrent restores, then a thousand concurrent turns, each cost at most one
    round trip per five calls, and every caller gets its own reply."""
    await storm(store, trips, SESSIONS)


async def test_storm_takes_few_round_trips_on_a_cluster(
    cluster_url: str, settings: StoreSettings, trips: Trips
) -> None:
    """On a Redis Cluster, a batch costs one round trip per node, not per call."""
    store = RedisStore(cluster_url, settings, on_round_trip=trips)
    try:
        await storm(store, trips, SESSIONS)
    finally:
        await store.aclose()


async def test_replies_are_read_from_the_hiredis_reader(
    store: RedisStore, trips: Trips, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With the redis-py and hiredis this project installs, a pipeline's replies come
    straight from the parser's reader: not one through ``read_response`` (which a
    connection's handshake still uses). A redis-py laid out otherwise fails here rather
    than quietly taking the slower road."""
    reads: list[object] = []
    read_response = _Connection.read_response

    async def counted(self: _Connection, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("timeout") == math.inf:  # the pipeline's way of calling it
            reads.append(kwargs)
        return await read_response(self, *args, **kwargs)

    monkeypatch.setattr(_Connection, "read_response", counted)
    await storm(store, trips, 300)
    assert trips.count > 0 and reads == []
    monkeypatch.setattr(pipeline, "_HIREDIS", None)  # the other road counts
    assert len(await restored(store, callers(50, "other"))) == 50
    assert len(reads) == 50


async def test_lone_calls_go_at_once(store: RedisStore, trips: Trips) -> None:
    """Calls made one after the other each go out at once, one round trip each: no timer
    holds a lone call back waiting for company."""
    caller = callers(1, "lone")[0]
    s = (await restored(store, [caller]))[0]
    trips.reset()
    took = []
    for i in range(20):
        w = write(s, f"t{i}", T0 + i, name=f"n{i}")
        begun = time.monotonic()
        assert (await store.write_turn(caller, s.session_id, w)).applied
        took.append(time.monotonic() - begun)
        s.commit(w)
    assert trips.ops == [1] * 20
    assert sorted(took)[10] < 0.05


async def test_a_call_right_after_a_reply_is_sent(
    redis_url: str, settings: StoreSettings, trips: Trips
) -> None:
    """With one pipeline, a call made as soon as the previous reply arrives (while its sender
    is finishing) still goes out: the sender leaves its place before anyone can wait for it."""
    store = RedisStore(redis_url, settings, max_connections=1, on_round_trip=trips)
    try:
        caller = callers(1, "next")[0]
        s = (await restored(store, [caller]))[0]
        for i in range(10):
            w = write(s, f"t{i}", T0 + i, name=f"n{i}")
            async with asyncio.timeout(5):
                assert (await store.write_turn(caller, s.session_id, w)).applied
            s.commit(w)
    finally:
        await store.aclose()


async def test_batching_off_sends_each_call_alone(
    redis_url: str, settings: StoreSettings, trips: Trips
) -> None:
    """With batching off, concurrent calls each take a round trip of their own."""
    store = RedisStore(redis_url, settings, batching=False, on_round_trip=trips)
    try:
        await restored(store, callers(50, "solo"))
        assert trips.ops == [1] * 50
    finally:
        await store.aclose()


async def test_conflict_fails_only_its_own_call(
    store: RedisStore, trips: Trips, reading: str
) -> None:
    """A write under a stale epoch, sent in the same pipeline as others, gets its conflict;
    the others are applied."""
    keys = callers(50, "conf")
    sessions = await restored(store, keys)
    stale = sessions[7]
    stale.epoch -= 1  # as if a newer hello had taken it over
    trips.reset()
    results = await asyncio.gather(
        *(
            store.write_turn(c, s.session_id, write(s, "t1", T0 + 1, name="x"))
            for c, s in zip(keys, sessions, strict=True)
        ),
        return_exceptions=True,
    )
    assert trips.ops == [50]
    conflict = results.pop(7)
    assert isinstance(conflict, StoreConflict) and "newer connection" in str(conflict)
    assert all(not isinstance(r, BaseException) and r.applied for r in results)


async def test_script_error_fails_only_its_own_call(redis_url: str, reading: str) -> None:
    """A script that raises an error in Redis fails its own call; the other calls of the
    pipeline get their replies."""
    client = aioredis.Redis.from_url(redis_url)
    script = client.register_script(
        "if ARGV[1] == 'boom' then return redis.error_reply('boom') end return ARGV[1]"
    )
    trips = Trips()
    pipeline = AutoPipeline(
        client, ack_replicas=0, wait_ms=1, timeout=2.0, max_connections=4, on_round_trip=trips
    )
    try:
        args = [["boom" if i == 3 else f"v{i}"] for i in range(20)]
        results = await asyncio.gather(
            *(pipeline.run(script, [], a, durable=True) for a in args), return_exceptions=True
        )
    finally:
        await pipeline.aclose()
        await client.aclose()
    error = results.pop(3)
    assert isinstance(error, rex.ResponseError) and "boom" in str(error)
    assert results == [f"v{i}".encode() for i in range(20) if i != 3]
    assert trips.ops[-1] == 20


async def test_calls_survive_script_flush(
    store: RedisStore, trips: Trips, redis_url: str, reading: str
) -> None:
    """After SCRIPT FLUSH between and during batches, the scripts are loaded again and only
    the calls that met NOSCRIPT are sent again: every call succeeds."""
    keys = callers(200, "flush")
    sessions = await restored(store, keys)
    admin = redis.Redis.from_url(redis_url)
    try:
        for n in range(1, 6):
            admin.script_flush()
            trips.reset()
            batch = [write(s, f"t{n}", T0 + n, name=f"r{n}") for s in sessions]
            flushing = asyncio.create_task(asyncio.to_thread(admin.script_flush))
            results = await asyncio.gather(
                *(
                    store.write_turn(c, s.session_id, w)
                    for c, s, w in zip(keys, sessions, batch, strict=True)
                )
            )
            await flushing
            assert all(r.applied and r.version == n for r in results)
            for s, w in zip(sessions, batch, strict=True):
                s.commit(w)
            # NOSCRIPT, SCRIPT LOAD, resend: the load carries no call.
            assert 0 in trips.ops
            assert trips.count <= 0.2 * len(keys)
    finally:
        admin.close()


async def test_redis_dying_mid_batch_fails_every_call(
    own_redis: RedisServer, settings: StoreSettings, reading: str
) -> None:
    """Redis killed while a pipeline waits for its replies: every call of it fails with a
    store error, none hangs, and retrying each once Redis is back applies each turn once."""
    trips = Trips()
    store = RedisStore(own_redis.url, settings, socket_timeout=5.0, on_round_trip=trips)
    keys = callers(300, "die")
    try:
        sessions = await restored(store, keys)
        writes = [write(s, "t1", T0 + 1, name="Ada") for s in sessions]
        started = threading.Event()
        thread = busy(own_redis.url, 3000, started)
        started.wait(5)
        await asyncio.sleep(0.2)  # the busy script runs
        trips.reset()
        calls = [
            asyncio.ensure_future(store.write_turn(c, s.session_id, w))
            for c, s, w in zip(keys, sessions, writes, strict=True)
        ]
        await asyncio.sleep(0.3)  # sent, waiting behind the busy script
        assert trips.count <= 4 and not any(c.done() for c in calls)
        began = time.monotonic()
        own_redis.kill()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert time.monotonic() - began < 2.5
        assert all(isinstance(r, StoreUnavailable) for r in results), results[:3]
        thread.join(5)
        own_redis.start()  # AOF on disk; the scripts are gone
        again = await asyncio.gather(
            *(
                store.write_turn(c, s.session_id, w)
                for c, s, w in zip(keys, sessions, writes, strict=True)
            )
        )
        assert all(r.applied and r.version == 1 for r in again)
    finally:
        await store.aclose()


async def test_a_hung_redis_times_out_the_whole_round_trip(
    own_redis: RedisServer, settings: StoreSettings, reading: str
) -> None:
    """Redis stopped (SIGSTOP) under a batch: every call fails as a timeout within about the
    store's timeout, one deadline for the whole round trip rather than one per reply, and
    the store serves again once Redis resumes."""
    store = RedisStore(own_redis.url, settings, socket_timeout=0.5)
    keys = callers(200, "hung")
    assert own_redis.proc is not None
    try:
        await restored(store, keys)  # scripts loaded, connections open
        own_redis.proc.send_signal(signal.SIGSTOP)
        began = time.monotonic()
        async with asyncio.timeout(5):
            results = await asyncio.gather(
                *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in keys),
                return_exceptions=True,
            )
        took = time.monotonic() - began
        own_redis.proc.send_signal(signal.SIGCONT)
        assert all(isinstance(r, StoreTimeout) for r in results), results[:3]
        assert took < 1.5
        assert len(await restored(store, keys)) == len(keys)
    finally:
        own_redis.proc.send_signal(signal.SIGCONT)
        await store.aclose()


async def test_a_deadline_that_redis_py_swallows_still_ends_the_round_trip(
    own_redis: RedisServer, settings: StoreSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The round trip's deadline fires as redis-py's write completes inside its
    asyncio.wait_for, which on Python 3.11 swallows the cancellation: the calls still fail
    as timeouts at about the store's timeout, not when a busy Redis answers 3 s later."""
    store = RedisStore(own_redis.url, settings, socket_timeout=0.5)
    keys = callers(20, "swallow")
    senders: list[asyncio.Task[Any]] = []
    send, write = _Connection.send_packed_command, _Connection._send_packed_command

    async def send_packed_command(
        self: _Connection, command: Any, check_health: bool = True
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        senders.append(task)
        await send(self, command, check_health)

    async def write_until_the_deadline(self: _Connection, command: Any) -> None:
        await write(self, command)
        # Fault injection: the write completes just as the round trip's deadline cancels
        # the sender, as after an event-loop stall.
        while not senders[-1].cancelling():
            await asyncio.sleep(0)

    try:
        await restored(store, keys)  # scripts loaded, connections open
        started = threading.Event()
        thread = busy(own_redis.url, 3000, started)
        started.wait(5)
        await asyncio.sleep(0.2)  # the busy script runs
        monkeypatch.setattr(_Connection, "send_packed_command", send_packed_command)
        monkeypatch.setattr(_Connection, "_send_packed_command", write_until_the_deadline)
        began = time.monotonic()
        async with asyncio.timeout(10):
            results = await asyncio.gather(
                *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in keys),
                return_exceptions=True,
            )
        took = time.monotonic() - began
        monkeypatch.undo()
        thread.join(5)
        assert all(isinstance(r, StoreTimeout) for r in results), results[:3]
        assert took < 1.5
        assert len(await restored(store, keys)) == len(keys)
    finally:
        await store.aclose()


async def test_cancelled_callers_leave_the_batch_alone(
    store: RedisStore, trips: Trips, redis_url: str
) -> None:
    """Callers cancelled while queued are not sent, callers cancelled in flight stop waiting,
    and the other calls of those batches get their replies."""
    keys = callers(100, "cancel")
    sessions = await restored(store, keys)
    trips.reset()

    def start() -> list[asyncio.Future[object]]:
        return [
            asyncio.ensure_future(store.write_turn(c, s.session_id, write(s, "t1", T0 + 1)))
            for c, s in zip(keys, sessions, strict=True)
        ]

    queued = start()  # each call queued as write_turn returns; the sender starts later
    for task in queued[::10]:
        task.cancel()  # before any sender took them
    results = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[::10])
    assert all(r.applied for i, r in enumerate(results) if i % 10)
    assert sum(trips.ops) == 90

    started = threading.Event()
    thread = busy(redis_url, 500, started)
    started.wait(5)
    await asyncio.sleep(0.1)
    flying = start()
    await asyncio.sleep(0.1)  # sent, waiting behind the busy script
    for task in flying[::10]:
        task.cancel()
    results = await asyncio.gather(*flying, return_exceptions=True)
    thread.join(5)
    assert all(isinstance(r, asyncio.CancelledError) for r in results[::10])
    # The second write of each turn ID is recognised: dup with version 1, or its own.
    assert all(r.version == 1 for i, r in enumerate(results) if i % 10)
    # Nothing is left behind: a lone call still goes at once.
    s = sessions[1]
    await store.touch(keys[1], s.session_id, T0 + 5, epoch=s.epoch, owner="me")  # loads it
    trips.reset()
    await store.touch(keys[1], s.session_id, T0 + 6, epoch=s.epoch, owner="me")
    assert trips.ops == [1]


async def test_aclose_does_not_hang(redis_url: str, settings: StoreSettings) -> None:
    """Closing the store while pipelines are in flight and calls are queued returns within
    about the store's timeout: the calls in flight end with their replies or an error, the
    queued ones fail as unavailable."""
    store = RedisStore(redis_url, settings, socket_timeout=0.5, max_connections=1)
    keys = callers(600, "close")
    sessions = await restored(store, keys)
    started = threading.Event()
    thread = busy(redis_url, 2000, started)
    started.wait(5)
    await asyncio.sleep(0.1)
    calls = [
        asyncio.ensure_future(store.write_turn(c, s.session_id, write(s, "t1", T0 + 1)))
        for c, s in zip(keys, sessions, strict=True)
    ]
    await asyncio.sleep(0.05)
    began = time.monotonic()
    await store.aclose()
    assert time.monotonic() - began < 2.0
    async with asyncio.timeout(2):
        results = await asyncio.gather(*calls, return_exceptions=True)
    thread.join(5)
    assert all(isinstance(r, StoreError) for r in results)
    assert any(isinstance(r, StoreUnavailable) and "closed" in str(r) for r in results)


async def test_one_wait_covers_every_write_of_a_pipeline(tmp_path: Path) -> None:
    """With ack_replicas, the writes of a pipeline are acknowledged together when the replica
    has them, and all fail as unavailable when it is down; the restores sharing that
    pipeline are not held to the WAIT."""
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", replica_of=primary.port)
    replica.start()
    trips = Trips()
    store = RedisStore(
        primary.url,
        StoreSettings(key_prefix="wait:"),
        socket_timeout=0.5,
        ack_replicas=1,
        on_round_trip=trips,
    )
    keys = callers(100, "wait")
    try:
        primary.wait_replicas()
        sessions = await restored(store, keys)
        trips.reset()
        results = await asyncio.gather(
            *(
                store.write_turn(c, s.session_id, write(s, "t1", T0 + 1))
                for c, s in zip(keys, sessions, strict=True)
            )
        )
        assert all(r.applied for r in results)
        assert trips.count <= 5
        replica.kill()
        trips.reset()
        more = callers(20, "wait-new")
        outcome = await asyncio.gather(
            *(
                store.write_turn(c, s.session_id, write(s, "t1", T0 + 2))
                for c, s in zip(keys, sessions, strict=True)
            ),
            *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in more),
            return_exceptions=True,
        )
        assert trips.count <= 5
        turns, restores = outcome[: len(keys)], outcome[len(keys) :]
        assert all(isinstance(r, StoreUnavailable) and "0 of 1 replicas" in str(r) for r in turns)
        assert all(not isinstance(r, BaseException) and r.session is not None for r in restores)
    finally:
        await store.aclose()
        replica.kill()
        primary.kill()


async def test_gateway_counts_round_trips(redis_url: str, config: Config) -> None:
    """A gateway on Redis exports its round trips and the calls each carried."""
    metrics = Metrics()
    # Built but not started (make_gateway would start it): only the calls below reach Redis.
    gw = Gateway(config.replace("store", redis_url=redis_url), metrics=metrics)
    try:
        caller = callers(1, "gw")[0]
        await gw.store.restore(caller, token=None, candidate=candidate(), now_ms=T0)
        # A restore, plus SCRIPT LOAD and a resend if the script was new to this Redis.
        before = metrics.registry.get_sample_value("hangon_store_round_trips_total") or 0
        carried = metrics.registry.get_sample_value("hangon_store_pipeline_ops_count")
        assert before in (1, 3) and carried == (before + 1) // 2
        await gw.store.ping()
    finally:
        await gw.store.aclose()
    registry = metrics.registry
    assert registry.get_sample_value("hangon_store_round_trips_total") == before + 1
    assert registry.get_sample_value("hangon_store_pipeline_ops_count") == carried
    assert registry.get_sample_value("hangon_store_pipeline_ops_bucket", {"le": "1.0"}) == carried


@pytest.mark.parametrize("batching", [True, False])
async def test_a_turns_write_answers_a_callback_with_its_result(
    redis_url: str, settings: StoreSettings, batching: bool
) -> None:
    """write_turn returns a future, which holds the turn's Written once settled, or its
    own store error (a conflict, a bad argument): no coroutine to drive, none to await."""
    store = RedisStore(redis_url, settings, batching=batching)
    try:
        keys = callers(3, f"soon{batching}")
        s1, s2, s3 = await restored(store, keys)
        ok = store.write_turn(keys[0], s1.session_id, write(s1, "t1", T0 + 1, name="Ada"))
        behind = store.write_turn(keys[1], s2.session_id, write(s2, "t1", T0 + 1))
        bad = store.write_turn(keys[2], s3.session_id, write(s3, "", T0 + 1))  # no turn ID
        futures = [ok, behind, bad]
        assert all(isinstance(f, asyncio.Future) for f in futures)
        if batching:
            assert not any(isinstance(f, asyncio.Task) for f in futures)
        settled: list[asyncio.Future[object]] = []
        for f in futures:
            f.add_done_callback(settled.append)
        async with asyncio.timeout(5):
            while len(settled) < 3:
                await asyncio.sleep(0.01)
        assert ok.result().version == 1 and ok.result().applied
        assert behind.result().applied  # the control: its own write lands too
        assert isinstance(bad.exception(), StoreError)
        assert not bad.exception().retryable  # type: ignore[union-attr]
        again = store.write_turn(keys[1], s2.session_id, write(s2, "t2", T0 + 2))
        with pytest.raises(StoreConflict):  # s2 is still at version 0: behind the store
            await again
    finally:
        await store.aclose()
