"""The stores the suite runs against, and the keys every one of them seals with."""

from __future__ import annotations

import base64
from collections.abc import Callable
from typing import Any, Literal, get_args

import redis.asyncio as aioredis

from gateway.core.callerkey import parse_caller
from gateway.core.sealing import Keyring, aad
from gateway.store.base import SessionStore, StoreSettings, session_keys
from gateway.store.memory_store import MemoryStore
from gateway.store.redis_store import RedisStore

__all__ = [
    "STORE_KINDS",
    "TEST_CALLER_HASH_KEY",
    "TEST_KEYRING",
    "TEST_STATE_KEYS",
    "StoreFactory",
    "StoreKind",
    "new_store",
    "stored",
]

TEST_STATE_KEYS = "t1:" + base64.b64encode(bytes(range(32))).decode()
TEST_CALLER_HASH_KEY = base64.b64encode(bytes(range(32, 64))).decode()
TEST_KEYRING = Keyring.from_text(TEST_STATE_KEYS, TEST_CALLER_HASH_KEY)
"""The keys of every gateway and store in the suite; gateway subprocesses get them from
the environment (``HANGON_STATE_KEYS``, ``HANGON_CALLER_HASH_KEY``), as an operator's would."""

StoreKind = Literal["memory", "redis", "cluster"]
"""The embedded store, the run's private redis-server, or its private Redis Cluster."""
STORE_KINDS: tuple[StoreKind, ...] = get_args(StoreKind)

StoreFactory = Callable[[StoreSettings], SessionStore]
"""The ``make_store`` fixture: a new store of the test's kind with the given settings."""


def new_store(url: str | None, settings: StoreSettings) -> SessionStore:
    """A memory store without ``url``, else a Redis store on it (``redis+cluster://`` for a
    cluster)."""
    return MemoryStore(settings) if url is None else RedisStore(url, settings)


async def stored(
    redis_url: str, caller: dict[str, Any], key_prefix: str = "hangon:"
) -> dict[bytes, bytes]:
    """A session's hash as a Redis holds it, its sealed state opened."""
    key = session_keys(key_prefix, parse_caller(caller), TEST_KEYRING)[0]
    client = aioredis.Redis.from_url(redis_url)
    try:
        held: dict[bytes, bytes] = await client.hgetall(key)
        if b"state" in held:
            held[b"state"] = TEST_KEYRING.open(held[b"state"], aad(key, "state"))
        return held
    finally:
        await client.aclose()
