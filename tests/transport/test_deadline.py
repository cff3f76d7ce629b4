"""Deadlines of one length behind one timer: each item expires once, in order, not before
its time and not much after it; a cancelled one never, and it is let go at once."""

from __future__ import annotations

import asyncio
import logging
import weakref

import pytest

from gateway.transport.deadline import GRAIN, Deadlines


class Item:
    def __init__(self, name: str) -> None:
        self.name = name


async def test_items_expire_in_order_after_their_timeout() -> None:
    loop = asyncio.get_running_loop()
    expired: list[tuple[str, float]] = []
    deadlines = Deadlines(0.2, lambda item: expired.append((item.name, loop.time())))
    started = loop.time()
    deadlines.add(Item("a"))
    await asyncio.sleep(0.05)
    deadlines.add(Item("b"))
    await asyncio.sleep(0.1)
    assert expired == []  # neither is due yet
    await asyncio.sleep(0.2 + GRAIN + 0.1)
    assert [name for name, _ in expired] == ["a", "b"]
    assert expired[0][1] - started >= 0.2
    assert expired[1][1] - started >= 0.25
    assert len(deadlines) == 0
    deadlines.add(Item("c"))  # the timer is armed again after running dry
    await asyncio.sleep(0.2 + GRAIN + 0.1)
    assert [name for name, _ in expired] == ["a", "b", "c"]


@pytest.mark.usefixtures("no_collector")
async def test_a_cancelled_item_never_expires_and_is_let_go() -> None:
    expired: list[str] = []
    deadlines = Deadlines(0.1, lambda item: expired.append(item.name))
    kept, met = Item("kept"), Item("met")
    deadlines.add(kept)
    deadline = deadlines.add(met)
    ref = weakref.ref(met)
    deadline.cancel()
    del met
    assert ref() is None  # not held until its time
    await asyncio.sleep(0.1 + GRAIN + 0.1)
    assert expired == ["kept"]


async def test_a_failing_expiry_is_logged_and_the_rest_still_expire(
    caplog: pytest.LogCaptureFixture,
) -> None:
    expired: list[str] = []

    def expire(item: Item) -> None:
        if item.name == "bad":
            raise RuntimeError("boom")
        expired.append(item.name)

    deadlines = Deadlines(0.05, expire)
    for name in ("bad", "good"):
        deadlines.add(Item(name))
    with caplog.at_level(logging.ERROR, logger="gateway"):
        await asyncio.sleep(0.05 + GRAIN + 0.1)
    assert expired == ["good"]
    assert "deadline handling failed" in caplog.text


async def test_close_stops_every_deadline() -> None:
    expired: list[str] = []
    deadlines = Deadlines(0.05, lambda item: expired.append(item.name))
    deadlines.add(Item("a"))
    deadlines.close()
    await asyncio.sleep(0.05 + GRAIN + 0.1)
    assert expired == [] and len(deadlines) == 0


async def test_met_deadlines_do_not_pile_up() -> None:
    """Connections that upgrade at once leave nothing queued behind them for the timeout."""
    deadlines = Deadlines(10.0, lambda item: None)
    for n in range(1000):
        deadlines.add(Item(str(n))).cancel()
    assert len(deadlines) <= 1
    deadlines.close()
