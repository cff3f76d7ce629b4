"""What only the Redis store can show: key layout, TTLs, one round trip per operation."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator

import pytest
import redis
from redis.crc import key_slot

from gateway.core.callerkey import CallerKey
from gateway.store.base import StoreSettings
from gateway.store.redis_store import RedisStore
from tests.store.records import T0, candidate, write

CALLER = CallerKey("acme", "phone", "+14155550100", "call-1")


@pytest.fixture
async def store(redis_url: str, settings: StoreSettings) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_url, settings)
    yield s
    await s.aclose()


async def test_key_layout(store: RedisStore, redis_url: str, key_prefix: str) -> None:
    """Every key sits under prefix and tenant, they share one hash tag, none holds a phone
    number."""
    s = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0)).session
    assert s is not None
    await store.write_turn(CALLER, s.session_id, write(s, "t1", T0 + 1))
    s.version = 1
    await store.push(CALLER, s.session_id, s.push([], [b'{"type":"say"}'], acked_seq=0, now_ms=T0))
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in client.scan_iter(match=key_prefix + "*"))
    base = f"{key_prefix}acme:{{{CALLER.digest()}}}"
    assert keys == [f"{base}:msgs", f"{base}:session", f"{base}:turns"]
    assert len({key_slot(key.encode()) for key in keys}) == 1
    for key in keys:
        assert "4155550100" not in key
        assert 0 < client.pttl(key) <= 60_000
    fields = client.hgetall(keys[1])
    assert set(fields) == {
        b"sid",
        b"tok",
        b"ver",
        b"state",
        b"created",
        b"updated",
        b"origin",
        b"epoch",
        b"seq",
        b"push",
        b"owner",
        b"lease",
    }
    client.close()


async def test_end_shortens_ttl(store: RedisStore, redis_url: str, key_prefix: str) -> None:
    """After bye, the session's keys expire after end_ttl instead of ttl."""
    s = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0)).session
    assert s is not None
    await store.write_turn(CALLER, s.session_id, write(s, "t1", T0 + 1))
    await store.end(CALLER, s.session_id, T0 + 2, epoch=s.epoch)
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(match=key_prefix + "*"):
        assert 0 < client.pttl(key) <= 30_000
    client.close()


async def test_session_without_seq_takes_agent_output(
    store: RedisStore, redis_url: str, key_prefix: str
) -> None:
    """A session stored before messages existed (no seq field) counts as having sent none."""
    s = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0)).session
    assert s is not None
    client = redis.Redis.from_url(redis_url)
    (key,) = client.scan_iter(match=key_prefix + "*:session")
    client.hdel(key, "seq")
    client.close()
    await store.push(CALLER, s.session_id, s.push([], [b'{"type":"say"}'], acked_seq=0, now_ms=T0))
    again = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0, last_seq=0)
    assert again.session is not None and again.session.seq == 1
    assert again.messages == (b'{"type":"say"}',)


def _monitor(url: str, seen: list[tuple[str, str]], ready: threading.Event) -> None:
    client = redis.Redis.from_url(url)
    with client.monitor() as monitor:
        ready.set()
        while True:
            command = monitor.next_command()
            text = command["command"]
            if text.startswith("ECHO end-of-test"):
                break
            seen.append((command["client_type"], text.split(" ", 1)[0].upper()))
    client.close()


async def test_one_round_trip_per_operation(store: RedisStore, redis_url: str) -> None:
    """A restore and a turn each reach Redis as one EVALSHA; the rest runs inside the script."""
    await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0)  # loads scripts
    seen: list[tuple[str, str]] = []
    ready = threading.Event()
    thread = threading.Thread(target=_monitor, args=(redis_url, seen, ready), daemon=True)
    thread.start()
    ready.wait(5)
    restored = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 1)
    assert restored.session is not None
    await store.write_turn(
        CALLER, restored.session.session_id, write(restored.session, "t1", T0 + 2)
    )
    await store.client.echo("end-of-test")
    thread.join(5)
    from_clients = [name for kind, name in seen if kind != "lua"]
    assert from_clients == ["EVALSHA", "EVALSHA"]
    assert ("lua", "HSET") in seen


async def test_busy_pool_queues_instead_of_failing(redis_url: str, settings: StoreSettings) -> None:
    """With more concurrent operations than connections, operations wait for a connection."""
    store = RedisStore(redis_url, settings, max_connections=2)
    try:
        callers = [CallerKey("acme", "user", f"u{i}", "c") for i in range(50)]
        results = await asyncio.gather(
            *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in callers)
        )
        assert all(r.session is not None for r in results)
    finally:
        await store.aclose()


async def test_retried_push_never_moves_updated_back(
    store: RedisStore, redis_url: str, key_prefix: str
) -> None:
    """A push retried after a later turn (its first try landed, its reply was lost) leaves
    the session's activity time where the turn put it, not at the push's older time."""
    from gateway.core.callerkey import parse_caller
    from gateway.store.base import session_keys

    caller = parse_caller({"user_id": "u-upd", "call_id": "c"})
    key = session_keys(key_prefix, caller)[0]
    client = redis.Redis.from_url(redis_url)
    try:
        s = (await store.restore(caller, token=None, candidate=candidate(), now_ms=T0)).session
        assert s is not None
        push = s.push([], [b'{"say":"hi"}'], acked_seq=0, now_ms=T0 + 1000)
        await store.push(caller, s.session_id, push)
        later = write(s, "t1", T0 + 9000, name="Ada")
        assert (await store.write_turn(caller, s.session_id, later)).applied
        await store.push(caller, s.session_id, push)
        assert int(client.hget(key, "updated")) == T0 + 9000
    finally:
        client.close()
