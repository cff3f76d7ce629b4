"""Write and push IDs are unique, in every process."""

from __future__ import annotations

import os

from gateway.core import ids
from gateway.core.ids import unique_id


def test_unique() -> None:
    assert len({unique_id() for _ in range(10_000)}) == 10_000


def test_forked_child_does_not_repeat_parent() -> None:
    """A child must not hand out the IDs its parent hands out next."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, unique_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert child
    assert child != unique_id()


def test_reseed() -> None:
    """What the child runs at the fork (the test above shows that it runs)."""
    before = unique_id()
    ids._reseed()
    after = unique_id()
    assert after[:12] != before[:12]
    assert after.endswith("0")
