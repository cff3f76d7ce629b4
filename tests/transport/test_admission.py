"""Admission control under a storm: a bounded number of restores at once, a bounded queue,
and everyone past it refused at once with a hint of when to come back, which clients honour."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.protocol import State

from gateway.config import Config
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from gateway.transport.admission import Admission
from tests.support.clock import Clock
from tests.support.gateways import GatewayFactory
from tests.support.gwmetrics import sample
from tests.support.poll import until
from tests.support.stores import StoreFactory
from tests.support.storewrap import Gated
from tests.support.wsclient import recv, send, url

REDIS = pytest.mark.stores("redis")


def caller(n: int) -> dict[str, str]:
    return {"user_id": f"u{n}", "call_id": f"storm-{n}"}


Admitting = Callable[[int], AbstractAsyncContextManager[tuple[Gateway, Gated]]]


@pytest.fixture
def admitting(
    make_gateway: GatewayFactory,
    config: Config,
    settings: StoreSettings,
    make_store: StoreFactory,
    clock: Clock,
) -> Admitting:
    """``async with admitting(queue) as (gw, store)``: a gateway that restores one session
    at a time with ``queue`` hellos waiting, on a store whose restores wait at its gate."""

    @contextlib.asynccontextmanager
    async def open_gateway(queue: int) -> AsyncIterator[tuple[Gateway, Gated]]:
        store = Gated(make_store(settings))
        cfg = config.replace("limits", max_restores=1, restore_queue=queue)
        async with make_gateway(cfg, store=store, clock=clock) as gw:
            try:
                yield gw, store
            finally:
                store.gate.set()  # or a failed test hangs in the gateway's shutdown

    return open_gateway


@REDIS
async def test_restores_are_bounded_queued_in_order_and_the_rest_shed(
    admitting: Admitting,
) -> None:
    """With one restore at a time and two waiting, a fourth hello gets 1013 with retry_after
    and a new upgrade gets 503 with Retry-After; opening the gate welcomes the others."""
    async with admitting(2) as (gw, store):
        # Four connections open while there is room; the fourth says hello last.
        sockets = [await connect(url(gw.port)) for _ in range(4)]
        late = sockets.pop()
        for n, ws in enumerate(sockets):
            await send(ws, {"type": "hello", "caller": caller(n)})
            await until(
                lambda n=n: gw.sessions.admission.restoring + gw.sessions.admission.waiting == n + 1
            )
        assert (gw.sessions.admission.restoring, gw.sessions.admission.waiting) == (1, 2)
        assert store.entered == 1
        assert sample(gw, "hangon_admission_waiting") == 2

        async with late:
            await send(late, {"type": "hello", "caller": caller(9)})
            error = await recv(late)
            await late.wait_closed()
        assert error["code"] == "overloaded" and error["close_code"] == 1013
        assert error["reconnect"] is True and 0.5 <= error["retry_after"] <= 30
        assert late.close_code == 1013

        with pytest.raises(InvalidStatus) as refused:
            await connect(url(gw.port))
        assert refused.value.response.status_code == 503
        assert int(refused.value.response.headers["Retry-After"]) >= 1

        store.gate.set()
        welcomes = [await recv(ws) for ws in sockets]
        assert [w["type"] for w in welcomes] == ["welcome"] * 3
        for ws in sockets:
            await ws.close()
    assert sample(gw, "hangon_admission_shed_total", stage="hello") == 1
    assert sample(gw, "hangon_admission_shed_total", stage="upgrade") == 1
    assert sample(gw, "hangon_protocol_errors_total", code="overloaded") == 1


@REDIS
async def test_a_hello_whose_client_left_is_not_restored(
    admitting: Admitting,
) -> None:
    """A queued hello whose client went away before its turn restores nothing: it would take
    the session from wherever the client reconnected."""
    async with admitting(10) as (gw, store):
        first = await connect(url(gw.port))
        await send(first, {"type": "hello", "caller": caller(0)})
        await until(lambda: gw.sessions.admission.restoring == 1)
        gone = await connect(url(gw.port))
        await send(gone, {"type": "hello", "caller": caller(1)})
        await until(lambda: gw.sessions.admission.waiting == 1)
        gone.transport.abort()
        await until(lambda: any(c.ws.state is State.CLOSED for c in gw.sessions.connections))
        store.gate.set()
        assert (await recv(first))["type"] == "welcome"
        await until(lambda: gw.sessions.admission.waiting + gw.sessions.admission.restoring == 0)
        assert store.entered == 1
        await first.close()


def test_retry_after_grows_with_the_queue_and_is_bounded() -> None:
    """The hint is about the time the queue takes to drain, spread up to twice that, and
    stays within 0.5-30 s."""
    admission = Admission(10, 100)
    admission.mean_seconds = 0.1
    short = [admission.retry_after() for _ in range(200)]
    assert 0.5 <= min(short) and max(short) <= 1.0 and len(set(short)) > 10  # spread too
    admission.waiting = 100  # 100 waiting at 0.1 s over 10 slots: 1 s to drain
    hints = [admission.retry_after() for _ in range(200)]
    assert 1.0 <= min(hints) and max(hints) <= 2.0 and max(hints) - min(hints) > 0.5
    admission.waiting = 10**6
    assert admission.retry_after() == 30


async def restore(admission: Admission, now: list[float], count: int, seconds: float) -> None:
    """Run ``count`` restores one after another, each taking ``seconds`` on the clock ``now``."""
    for _ in range(count):
        async with admission.slot():
            now[0] += seconds


async def test_retry_after_follows_the_rate_restores_finish_at() -> None:
    """The hint is the queue over the rate restores really finish at: restores done one at a
    time, 100 a second, make 500 waiting a 5-10 s hint, whatever the slots promise."""
    now = [0.0]
    admission = Admission(128, 1000, clock=lambda: now[0])
    await restore(admission, now, 101, 0.01)
    admission.waiting = 500
    hints = [admission.retry_after() for _ in range(100)]
    assert 5.0 <= min(hints) and max(hints) <= 10.0


async def test_restores_of_an_earlier_burst_do_not_stretch_a_new_storms_hints() -> None:
    """Restores that finished a minute before a storm are not part of its rate: 40
    restores at 100 a second into the storm make 500 waiting a 5-10 s hint, not the 30 s
    cap that a rate spread over the idle minute would give."""
    now = [0.0]
    admission = Admission(128, 1000, clock=lambda: now[0])
    await restore(admission, now, 101, 0.01)  # the connects, long ago
    now[0] = 60.0
    await restore(admission, now, 40, 0.01)
    admission.waiting = 500
    hints = [admission.retry_after() for _ in range(100)]
    assert 5.0 <= min(hints) and max(hints) <= 10.0


async def test_a_storms_first_restores_do_not_set_its_rate() -> None:
    """Until 32 restores have finished, the hint comes from the slots and the mean restore
    time, not from the spacing of a first few restores that trickled out slowly."""
    now = [0.0]
    admission = Admission(128, 1000, clock=lambda: now[0])
    for _ in range(5):  # one a second: the process is busy accepting the storm
        async with admission.slot():
            now[0] += 0.005
        now[0] += 0.995
    admission.waiting = 500
    assert max(admission.retry_after() for _ in range(100)) <= 1.0
