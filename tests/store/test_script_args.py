"""Every Redis script checks all its arguments before its first write.

Redis keeps the writes of a script that fails half way, so a script must refuse a bad
argument before it changes anything. Each test sets up a real session through the store,
takes the arguments the store would send to one script, replaces one of them by values out of
range, malformed or huge, calls the script itself, and checks that the call fails and that
Redis is byte for byte as before (``DUMP`` of every key, and no TTL refreshed).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import redis

from gateway.exceptions import StoreError
from gateway.store import redis_store
from gateway.store.redis_store import RedisStore
from gateway.store.retry import retry
from tests.support.records import CALLER, T0, candidate, write

# The store fixture's store is then on the run's Redis, which the tests read at redis_url.
pytestmark = pytest.mark.stores("redis")

MB = 1 << 20
SEALED_HEADER = b"\x01\x02t1"
"""What a sealed blob starts with under the test keyring (key ID ``t1``)."""

_INT = [
    "4611686018427387904",  # 2**62: the value of the hello that broke restore.lua
    "9007199254740992",  # 2**53: one past the limit
    "18446744073709551616",  # 2**64
    "1e400",
    "1e3",
    "nan",
    "inf",
    "-inf",
    "-5",
    "-0",
    "007",
    "0x10",
    " 5",
    "5 ",
    "1.5",
    "",
    "abc",
    "9" * MB,
]
BAD: dict[str, list[str | bytes]] = {
    "int": [*_INT, "-1"],
    "int-or-none": [*_INT, "-2"],  # -1 means none
    "ttl": [*_INT, "-1", "0"],
    "digest": ["", "abc", "A" * 64, "0" * 63, "0" * 65, "g" * 64, "0" * MB],
    "digest-or-none": ["abc", "A" * 64, "0" * 63, "0" * 65, "g" * 64, "0" * MB],
    "id": ["", "x" * MB],  # session, write and push IDs: 1 to 128 bytes
    "turn-id": ["", "x" * MB],  # 1 to 512 bytes
    "owner": ["x" * MB],  # 0 to 512 bytes
    "sealed": [
        "",
        "abc",
        b"\x02\x02t1" + bytes(40),  # another version
        SEALED_HEADER + bytes(27),  # shorter than nonce and tag
        SEALED_HEADER + bytes(16 * MB),  # past 16 MiB
    ],
    "sealed-or-none": [
        "abc",
        SEALED_HEADER + bytes(27),
        SEALED_HEADER + bytes(16 * MB),
    ],
}
"""Bad values by the kind of argument."""

SCRIPTS: dict[str, list[tuple[str, str]]] = {
    "restore": [
        ("now_ms", "int"),
        ("max_age_ms", "int-or-none"),
        ("ttl_ms", "ttl"),
        ("token", "digest-or-none"),
        ("session_id", "id"),
        ("candidate_token", "digest"),
        ("state", "sealed"),
        ("last_seq", "int-or-none"),
        ("owner", "owner"),
        ("lease_ms", "int"),
    ],
    "turn": [
        ("session_id", "id"),
        ("base_version", "int"),
        ("version", "int"),
        ("state", "sealed"),
        ("turn_id", "turn-id"),
        ("now_ms", "int"),
        ("ttl_ms", "ttl"),
        ("turns_kept", "ttl"),
        ("epoch", "int"),
        ("write_id", "id"),
    ],
    "push": [
        ("session_id", "id"),
        ("epoch", "int"),
        ("base_version", "int"),
        ("version", "int"),
        ("state", "sealed-or-none"),
        ("base_seq", "int"),
        ("acked_seq", "int"),
        ("window", "int"),
        ("now_ms", "int"),
        ("ttl_ms", "ttl"),
        ("push_id", "id"),
        ("message", "sealed"),
    ],
    "end": [
        ("session_id", "id"),
        ("now_ms", "int"),
        ("end_ttl_ms", "ttl"),
        ("epoch", "int"),
    ],
    "touch": [
        ("session_id", "id"),
        ("now_ms", "int"),
        ("ttl_ms", "ttl"),
        ("epoch", "int"),
        ("owner", "owner"),
        ("lease_ms", "int"),
    ],
}
"""Each script's arguments, in order, and their kind."""

Snapshot = dict[bytes, tuple[bytes, int]]


class _Captured(Exception):
    """Raised instead of running a script: the store's arguments were taken."""


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(redis_url)
    yield c
    c.close()


async def calls(store: RedisStore) -> dict[str, Callable[[], Awaitable[object]]]:
    """Store a session with turns, messages and a rotated token; return one valid call of
    each script, each of which writes."""
    first = candidate()
    s = (await store.restore(CALLER, token=None, candidate=first, now_ms=T0)).session
    assert s is not None
    w1 = write(s, "t1", T0 + 1, name="Ada")
    await store.write_turn(CALLER, s.session_id, w1)
    s.commit(w1)
    p1 = s.push([{"context": {"k": "v"}}], [b'{"n":1}', b'{"n":2}'], acked_seq=0, now_ms=T0 + 2)
    await store.push(CALLER, s.session_id, p1)
    again = candidate()
    restored = await store.restore(
        CALLER, token=first.resume_token, candidate=again, now_ms=T0 + 3, last_seq=1, owner="gw-a"
    )
    s = restored.session
    assert s is not None
    sid, epoch = s.session_id, s.epoch
    turn = write(s, "t2", T0 + 5, name="Bea")
    push = s.push([{"context": {"j": "w"}}], [b'{"n":3}'], acked_seq=1, now_ms=T0 + 6)
    return {
        "restore": lambda: store.restore(
            CALLER,
            token=again.resume_token,
            candidate=candidate(),
            now_ms=T0 + 4,
            last_seq=2,
            owner="gw-b",
        ),
        "turn": lambda: store.write_turn(CALLER, sid, turn),
        "push": lambda: store.push(CALLER, sid, push),
        "end": lambda: store.end(CALLER, sid, T0 + 7, epoch=epoch),
        "touch": lambda: store.touch(CALLER, sid, T0 + 8, epoch=epoch, owner="gw-a"),
    }


async def captured(
    store: RedisStore, call: Callable[[], Awaitable[object]]
) -> tuple[str, list[str], list[Any]]:
    """The source, keys and arguments with which ``call`` would run its script."""
    got: list[tuple[str, list[str], list[Any]]] = []

    def submit(script: Any, keys: list[str], args: list[Any], **_: Any) -> Any:
        got.append((script.script, list(keys), list(args)))
        raise _Captured

    async def run(script: Any, keys: list[str], args: list[Any]) -> Any:
        return submit(script, keys, args)

    # A turn's write goes to the pipeline without a coroutine (submit); the rest via _run.
    store._run = run  # type: ignore[method-assign]
    store._scripts.submit = submit  # type: ignore[method-assign]
    try:
        with pytest.raises(_Captured):
            await call()
    finally:
        del store._run
        del store._scripts.submit
    return got[0]


def snapshot(client: redis.Redis, prefix: str) -> Snapshot:
    """Every key under ``prefix``: its ``DUMP`` and its TTL in milliseconds."""
    return {
        key: (client.dump(key), client.pttl(key))
        for key in sorted(client.scan_iter(match=prefix + "*"))
    }


def settle_ttls(client: redis.Redis, prefix: str) -> None:
    """Set every key's TTL below the store's, so that a script refreshing one shows."""
    for key in client.scan_iter(match=prefix + "*"):
        client.pexpire(key, 45_000)


def assert_unchanged(before: Snapshot, after: Snapshot, what: str) -> None:
    assert after.keys() == before.keys(), what
    for key, (dump, ttl) in before.items():
        assert after[key][0] == dump, f"{what}: {key!r} changed"
        # It only runs down; a script's PEXPIRE (the store's 60 s, or 30 s after bye) shows.
        assert 0 <= ttl - after[key][1] < 5_000, f"{what}: the TTL of {key!r} was set"


def evaluate(client: redis.Redis, source: str, keys: list[str], args: list[Any]) -> Any:
    return client.eval(source, len(keys), *keys, *args)


CASES = [(script, i, name) for script, spec in SCRIPTS.items() for i, (name, _) in enumerate(spec)]


@pytest.mark.parametrize(("script", "index", "name"), CASES, ids=[f"{s}-{n}" for s, _, n in CASES])
async def test_bad_argument_changes_nothing(
    store: RedisStore,
    client: redis.Redis,
    key_prefix: str,
    script: str,
    index: int,
    name: str,
) -> None:
    """Each bad value of this argument makes the script fail with its name, and Redis is
    byte for byte unchanged."""
    source, keys, args = await captured(store, (await calls(store))[script])
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    for value in BAD[SCRIPTS[script][index][1]]:
        bad = [*args[:index], value, *args[index + 1 :]]
        what = f"{script}.lua {name}={value[:40]!r}"
        with pytest.raises(redis.ResponseError, match=f"^hangon bad argument {name}$"):
            evaluate(client, source, keys, bad)
        assert_unchanged(before, snapshot(client, key_prefix), what)


@pytest.mark.parametrize("script", list(SCRIPTS))
async def test_good_arguments_write(
    store: RedisStore, client: redis.Redis, key_prefix: str, script: str
) -> None:
    """The arguments the store sends, unchanged, do write: the snapshot sees a script's
    writes, so the cases above would see a half-done one."""
    source, keys, args = await captured(store, (await calls(store))[script])
    assert len(args) == len(SCRIPTS[script])  # push's: one message
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    evaluate(client, source, keys, args)
    after = snapshot(client, key_prefix)
    assert after.keys() != before.keys() or any(after[k][0] != d for k, (d, _) in before.items())


@pytest.mark.parametrize("script", list(SCRIPTS))
async def test_wrong_count_changes_nothing(
    store: RedisStore, client: redis.Redis, key_prefix: str, script: str
) -> None:
    """A script given an argument too few or too many, or another number of keys, fails
    and Redis is unchanged."""
    source, keys, args = await captured(store, (await calls(store))[script])
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    fixed = len(SCRIPTS[script]) - (script == "push")  # push takes any number of messages
    too_many = [*args, *[args[-1]] * 1025] if script == "push" else [*args, "1"]
    for what, k, a in [
        ("too few", keys, args[: fixed - 1]),
        ("too many", keys, too_many),
        ("no arguments", keys, []),
    ]:
        with pytest.raises(redis.ResponseError, match="^hangon bad argument count$"):
            evaluate(client, source, k, a)
        assert_unchanged(before, snapshot(client, key_prefix), f"{script}.lua {what}")
    with pytest.raises(redis.ResponseError, match="^hangon bad argument keys$"):
        evaluate(client, source, keys[:2], args)
    assert_unchanged(before, snapshot(client, key_prefix), f"{script}.lua two keys")


async def test_push_past_the_largest_seq_changes_nothing(
    store: RedisStore, client: redis.Redis, key_prefix: str
) -> None:
    """A push whose messages would number past 2**53 - 1 fails and Redis is unchanged."""
    source, keys, args = await captured(store, (await calls(store))["push"])
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    args[5] = 2**53 - 1  # base_seq: its one message would be 2**53
    with pytest.raises(redis.ResponseError, match="^hangon bad argument base_seq$"):
        evaluate(client, source, keys, args)
    assert_unchanged(before, snapshot(client, key_prefix), "push.lua past 2**53 - 1")


@pytest.mark.parametrize("script", ["restore", "touch"])
async def test_lease_past_the_largest_time_changes_nothing(
    store: RedisStore, client: redis.Redis, key_prefix: str, script: str
) -> None:
    """A lease that would end past 2**53 - 1 ms fails and Redis is unchanged."""
    source, keys, args = await captured(store, (await calls(store))[script])
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    now = 0 if script == "restore" else 1
    args[now] = 2**53 - 10  # now_ms; the lease adds 60 s
    with pytest.raises(redis.ResponseError, match="^hangon bad argument lease_ms$"):
        evaluate(client, source, keys, args)
    assert_unchanged(before, snapshot(client, key_prefix), f"{script}.lua lease")


async def test_huge_last_seq_is_refused_and_changes_nothing(
    store: RedisStore, client: redis.Redis, key_prefix: str
) -> None:
    """A restore with last_seq 2**62 of a live session fails once, not retried, leaves
    Redis unchanged, and the live connection goes on writing."""
    first = candidate()
    s = (await store.restore(CALLER, token=None, candidate=first, now_ms=T0)).session
    assert s is not None
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    errors: list[StoreError] = []

    async def no_sleep(_: float) -> None:
        return None

    with pytest.raises(StoreError) as caught:
        await retry(
            lambda: store.restore(
                CALLER, token=first.resume_token, candidate=candidate(), now_ms=T0, last_seq=2**62
            ),
            [0.0] * 5,
            on_error=errors.append,
            sleep=no_sleep,
        )
    assert (caught.value.retryable, caught.value.op, caught.value.detail) == (
        False,
        "restore",
        "bad argument last_seq",
    )
    assert len(errors) == 1
    assert_unchanged(before, snapshot(client, key_prefix), "restore with last_seq 2**62")
    # Not fenced off: its epoch still holds.
    assert (await store.write_turn(CALLER, s.session_id, write(s, "t1", T0 + 1))).applied


async def test_a_script_refusal_is_not_retried(
    store: RedisStore, client: redis.Redis, key_prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the store's own checks, restore.lua refuses last_seq 2**53 itself, and the
    store raises the same error, not retried, with Redis unchanged."""
    first = candidate()
    s = (await store.restore(CALLER, token=None, candidate=first, now_ms=T0)).session
    assert s is not None
    monkeypatch.setattr(redis_store, "check_restore", lambda *a, **k: None)
    settle_ttls(client, key_prefix)
    before = snapshot(client, key_prefix)
    with pytest.raises(StoreError) as caught:
        await store.restore(
            CALLER, token=first.resume_token, candidate=candidate(), now_ms=T0, last_seq=2**53
        )
    assert type(caught.value) is StoreError
    assert (caught.value.retryable, caught.value.detail) == (False, "bad argument last_seq")
    assert isinstance(caught.value.__cause__, redis.ResponseError)
    assert_unchanged(before, snapshot(client, key_prefix), "restore with last_seq 2**53")


async def test_the_largest_values_are_taken(store: RedisStore) -> None:
    """The limits are inclusive: last_seq 2**53 - 1 (the protocol's largest) resumes."""
    first = candidate()
    await store.restore(CALLER, token=None, candidate=first, now_ms=T0)
    got = await store.restore(
        CALLER, token=first.resume_token, candidate=candidate(), now_ms=T0, last_seq=2**53 - 1
    )
    assert got.session is not None
    assert (got.replay.start, got.replay.partial) == (1, True)
