"""Random bytes fetched in bulk are still handed out once, in every process."""

from __future__ import annotations

import os
import secrets

from gateway.core import entropy
from gateway.core.entropy import random_bytes, random_token, unique_id


def test_bytes_never_repeat_across_fetches() -> None:
    """Each take is fresh, across many refills of the pool."""
    seen = {random_bytes(12) for _ in range(5000)}  # 60,000 bytes: 15 fetches
    assert len(seen) == 5000
    assert all(len(nonce) == 12 for nonce in seen)


def test_large_take() -> None:
    assert len(random_bytes(4096)) == 4096
    assert random_bytes(4096) != random_bytes(4096)


def test_forked_child_does_not_repeat_parent() -> None:
    """A child must not hand out what its parent fetched before the fork (the same
    nonces under the same key)."""
    random_bytes(12)  # the pool is filled now
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, random_bytes(12))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 12)
    os.close(read)
    assert len(child) == 12
    assert child != random_bytes(12)


def test_token_like_secrets() -> None:
    assert len(random_token(16)) == len(secrets.token_urlsafe(16))
    assert len(random_token(24)) == len(secrets.token_urlsafe(24))
    assert set(random_token(24)) <= set(
        "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    )


def test_unique_ids() -> None:
    ids = {unique_id() for _ in range(10_000)}
    assert len(ids) == 10_000


def test_forked_child_ids_differ() -> None:
    """What a forked child runs (as the test above shows, os.register_at_fork runs it):
    a fresh pool, and IDs with a prefix of their own."""
    before = unique_id()
    random_bytes(12)
    entropy._forget()
    after = unique_id()
    assert after[:12] != before[:12]
    assert after.endswith("0")  # the count starts again, under the new prefix
