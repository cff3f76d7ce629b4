"""A live session's lock taken without awaiting: only when ``acquire`` would not wait."""

from __future__ import annotations

import asyncio

from gateway.transport.sessions import SessionLock


async def test_try_acquire_takes_only_a_free_lock_nobody_waits_for() -> None:
    lock = SessionLock()
    assert lock.try_acquire() and lock.locked()
    assert not lock.try_acquire()  # held
    waiter = asyncio.ensure_future(lock.acquire())
    await asyncio.sleep(0)  # it waits
    lock.release()
    # Free, but the waiter is owed the lock: taking it now would jump the queue.
    assert not lock.locked() and not lock.try_acquire()
    assert await waiter and lock.locked()
    lock.release()
    assert lock.try_acquire()
    lock.release()


async def test_a_lock_taken_without_awaiting_makes_others_wait() -> None:
    lock = SessionLock()
    assert lock.try_acquire()
    order: list[str] = []

    async def other() -> None:
        async with lock:
            order.append("other")

    task = asyncio.ensure_future(other())
    await asyncio.sleep(0.01)
    assert order == []
    order.append("mine")
    lock.release()
    await task
    assert order == ["mine", "other"]
