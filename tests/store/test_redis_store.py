"""What only the Redis store can show: key layout, TTLs, one round trip per operation."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import redis
from redis.crc import key_slot

from gateway.core.callerkey import CallerKey
from gateway.core.resume import Outcome
from gateway.core.sealing import Keyring
from gateway.exceptions import StoreError
from gateway.store.base import StoreSettings, session_keys
from gateway.store.redis_store import RedisStore
from tests.support.records import OTHER, T0, candidate, new_session, write

CALLER = CallerKey("acme", "phone", "+14155550100", "call-1")


# The store fixture's store is then on the run's Redis, which the tests read at redis_url.
pytestmark = pytest.mark.stores("redis")


async def test_key_layout(store: RedisStore, redis_url: str, key_prefix: str) -> None:
    """Every key sits under prefix and tenant, they share one hash tag, none holds a phone
    number."""
    s = await new_session(store)
    await store.write_turn(CALLER, s.session_id, write(s, "t1", T0 + 1))
    s.version = 1
    await store.push(CALLER, s.session_id, s.push([], [b'{"type":"say"}'], acked_seq=0, now_ms=T0))
    client = redis.Redis.from_url(redis_url)
    keys = sorted(k.decode() for k in client.scan_iter(match=key_prefix + "*"))
    base = f"{key_prefix}acme:{{{store.settings.keyring.digest(CALLER)}}}"
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
        b"wid",
    }
    client.close()


async def test_end_shortens_ttl(store: RedisStore, redis_url: str, key_prefix: str) -> None:
    """After bye, the session's keys expire after end_ttl instead of ttl."""
    s = await new_session(store)
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
    s = await new_session(store)
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
    key = session_keys(key_prefix, caller, store.settings.keyring)[0]
    client = redis.Redis.from_url(redis_url)
    try:
        s = await new_session(store, caller)
        push = s.push([], [b'{"say":"hi"}'], acked_seq=0, now_ms=T0 + 1000)
        await store.push(caller, s.session_id, push)
        later = write(s, "t1", T0 + 9000, name="Ada")
        assert (await store.write_turn(caller, s.session_id, later)).applied
        await store.push(caller, s.session_id, push)
        assert int(client.hget(key, "updated")) == T0 + 9000
    finally:
        client.close()


def _raw_values(client: redis.Redis, prefix: str) -> list[bytes]:
    """Every key, hash field and value, zset member and list entry under ``prefix``."""
    out: list[bytes] = []
    for key in client.scan_iter(match=prefix + "*"):
        out.append(key)
        kind = client.type(key)
        if kind == b"hash":
            for field, value in client.hgetall(key).items():
                out += [field, value]
        elif kind == b"zset":
            out += [member for member, _ in client.zrange(key, 0, -1, withscores=True)]
        elif kind == b"list":
            out += client.lrange(key, 0, -1)
    return out


async def test_nothing_personal_is_stored_in_plaintext(
    store: RedisStore, redis_url: str, key_prefix: str
) -> None:
    """Raw Redis holds no phone number, name or form answer: not in keys, state or messages."""
    s = await new_session(store)
    w = write(s, "t1", T0 + 1, name="Ada Lovelace", dob="1815-12-10")
    await store.write_turn(CALLER, s.session_id, w)
    s.commit(w)
    push = s.push(
        [{"form_answers": {"city": "Marylebone"}}],
        [b'{"say":"Thanks Ada, you are booked for 1815-12-10"}'],
        acked_seq=0,
        now_ms=T0 + 2,
    )
    await store.push(CALLER, s.session_id, push)
    client = redis.Redis.from_url(redis_url)
    try:
        raw = b"\n".join(_raw_values(client, key_prefix))
    finally:
        client.close()
    assert b"sid" in raw and b"state" in raw  # the dump did find the session
    for secret in (b"4155550100", b"Ada", b"Lovelace", b"1815-12-10", b"Marylebone", b"booked"):
        assert secret not in raw
    again = await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 3)
    assert again.session is not None
    assert again.session.state["form_answers"] == {
        "name": "Ada Lovelace",
        "dob": "1815-12-10",
        "city": "Marylebone",
    }
    assert again.messages == (b'{"say":"Thanks Ada, you are booked for 1815-12-10"}',)


async def test_rotated_keys_open_old_state_and_a_missing_key_refuses(
    redis_url: str, settings: StoreSettings
) -> None:
    """After rotation, a store with the new key first still restores state sealed under the
    old one; a store without the old key fails the restore instead of starting afresh."""
    old = settings.keyring
    new_key = ("t2", bytes(range(64, 96)))
    rotated = Keyring((new_key, *old.keys), old.hash_key)
    before = RedisStore(redis_url, settings)
    after = RedisStore(redis_url, dataclasses.replace(settings, keyring=rotated))
    lost = RedisStore(
        redis_url, dataclasses.replace(settings, keyring=Keyring((new_key,), old.hash_key))
    )
    try:
        s = await new_session(before)
        w = write(s, "t1", T0 + 1, name="Ada")
        await before.write_turn(CALLER, s.session_id, w)
        with pytest.raises(StoreError, match="does not open: .*'t1', which is not listed"):
            await lost.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 2)
        back = await after.restore(CALLER, token=None, candidate=candidate(), now_ms=T0 + 3)
        assert back.outcome is Outcome.HIT and back.session is not None
        assert back.session.state["form_answers"] == {"name": "Ada"}
    finally:
        for store in (before, after, lost):
            await store.aclose()


async def test_state_copied_from_another_session_does_not_open(
    store: RedisStore, redis_url: str, key_prefix: str
) -> None:
    """A sealed state copied into another caller's record (same tenant) is refused on
    restore, never served as that caller's."""
    a = (await store.restore(CALLER, token=None, candidate=candidate(), now_ms=T0)).session
    b = (await store.restore(OTHER, token=None, candidate=candidate(), now_ms=T0)).session
    assert a is not None and b is not None
    await store.write_turn(CALLER, a.session_id, write(a, "t1", T0 + 1, name="Ada"))
    keyring = store.settings.keyring
    client = redis.Redis.from_url(redis_url)
    try:
        key_a = session_keys(key_prefix, CALLER, keyring)[0]
        key_b = session_keys(key_prefix, OTHER, keyring)[0]
        client.hset(key_b, "state", client.hget(key_a, "state") or b"")
    finally:
        client.close()
    with pytest.raises(StoreError, match="another session's"):
        await store.restore(OTHER, token=None, candidate=candidate(), now_ms=T0 + 2)
