"""``hangon serve --workers N``: N processes share one port (SO_REUSEPORT), each its own
instance; a crashed worker is started again, and SIGTERM drains them all and exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from tests.support.gateway_process import GatewayProcess
from tests.support.httpget import get
from tests.support.redis_server import RedisServer, free_port
from tests.support.wsclient import connect, hello, recv, turn, url

pytestmark = pytest.mark.slow

_STARTED = re.compile(r"worker started index=(\d+) pid=(\d+)")


def worker_pids(log: Path) -> dict[int, int]:
    """The newest PID of each worker, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in _STARTED.findall(log.read_text())}


@contextmanager
def serving(tmp_path: Path, redis: RedisServer, count: int) -> Iterator[GatewayProcess]:
    """``hangon serve --workers count`` on a free port, every worker listening; killed after."""
    log = tmp_path / "workers.log"
    gw = GatewayProcess(
        log,
        "--workers",
        str(count),
        "--redis-url",
        redis.url,
        "--downstream",
        "off",
        "--drain-period",
        "0.5",
        "--instance-id",
        "w",
        port=free_port(),
    )
    gw.start()
    deadline = time.monotonic() + 15
    while log.read_text().count("listening host=") < count:  # every worker, not just one
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    try:
        yield gw
    finally:
        assert gw.proc is not None
        if gw.proc.poll() is None:
            gw.kill()
        for pid in worker_pids(log).values():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def workers(tmp_path: Path, own_redis: RedisServer) -> Iterator[GatewayProcess]:
    """Two workers."""
    with serving(tmp_path, own_redis, 2) as gw:
        yield gw


async def owners(redis_url: str) -> set[bytes]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        keys = [k async for k in client.scan_iter(match="hangon:*:session")]
        return {await client.hget(k, "owner") for k in keys}  # type: ignore[misc]
    finally:
        await client.aclose()


async def test_workers_share_the_port_restart_and_drain(
    workers: GatewayProcess, own_redis: RedisServer
) -> None:
    """Sessions land on both workers (two owners in Redis, released on disconnect); a
    SIGKILLed worker comes back and the port keeps serving; SIGTERM closes clients with 1012
    and the supervisor exits 0."""
    gw, log = workers, workers.log_path
    assert gw.proc is not None
    sockets = [await connect(url(gw.port)).__aenter__() for _ in range(24)]
    for i, ws in enumerate(sockets):
        await hello(ws, {"user_id": f"u{i}", "call_id": "workers"})
        assert (await turn(ws, "t1", form={"n": i}))["version"] == 1
    # While connected, each session is owned by the worker serving it; on disconnect the
    # worker releases it.
    assert await owners(own_redis.url) == {b"w-0", b"w-1"}
    for ws in sockets:
        await ws.close()
    deadline = time.monotonic() + 5
    while await owners(own_redis.url) != {b""}:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)

    first = worker_pids(log)
    assert sorted(first) == [0, 1]
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 15
    while worker_pids(log)[0] == first[0]:
        assert time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.1)
    while log.read_text().count("listening host=") < 3:
        assert time.monotonic() < deadline, log.read_text()
        await asyncio.sleep(0.1)
    for i in range(24):
        async with connect(url(gw.port)) as ws:
            again = await hello(ws, {"user_id": f"u{i}", "call_id": "workers"})
        assert again["resumed"] is True and again["state"]["form_answers"] == {"n": i}

    async with connect(url(gw.port)) as ws:
        await hello(ws, {"user_id": "last", "call_id": "workers"})
        gw.proc.terminate()
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws, timeout=10)
    assert await asyncio.to_thread(gw.proc.wait, 20) == 0
    assert info.value.rcvd is not None and info.value.rcvd.code == 1012


async def test_sigterm_while_a_crashed_worker_waits_to_restart(workers: GatewayProcess) -> None:
    """SIGTERM in the second between a worker's crash and its restart: the supervisor starts
    no worker it would never stop, and exits."""
    log = workers.log_path
    assert workers.proc is not None
    os.kill(worker_pids(log)[0], signal.SIGKILL)
    while "worker exited index=0" not in log.read_text():
        await asyncio.sleep(0.01)
    workers.proc.terminate()
    # 1: a worker died (the one killed); what matters is that the supervisor exits.
    assert await asyncio.to_thread(workers.proc.wait, 10) in (0, 1)


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """One scrape of /metrics on the shared port: each sample by name and labels."""
    status, body, _ = await get(port, "/metrics")
    assert status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


async def test_one_scrape_of_the_shared_port_counts_every_worker(
    tmp_path: Path, own_redis: RedisServer
) -> None:
    """Sessions on three workers: any scrape of the port gives the totals of all three (not
    the sample of one); a SIGKILLed worker's counters stay in the totals, not reset and not
    doubled by its successor, and its sessions leave the gauges."""
    applied = ("hangon_session_turns_total", (("outcome", "applied"),))
    active = ("hangon_session_active", ())
    with serving(tmp_path, own_redis, 3) as gw:
        callers = [{"user_id": f"u{i}", "call_id": "scrape"} for i in range(36)]
        sockets = [await connect(url(gw.port)).__aenter__() for _ in callers]
        for ws, caller in zip(sockets, callers, strict=True):
            await hello(ws, caller)
            assert (await turn(ws, "t1", form={"n": 1}))["version"] == 1
        assert await owners(own_redis.url) == {b"w-0", b"w-1", b"w-2"}
        scrapes = [await scrape(gw.port) for _ in range(6)]  # the kernel picks the worker
        for seen in scrapes:
            assert seen[applied] == 36 and seen[active] == 36, seen
            assert seen[("hangon_connection_active", ())] == 36
            assert seen[("hangon_server_draining", ())] == 0
        assert {(await get(gw.port, "/readyz"))[0] for _ in range(6)} == {200}

        killed = worker_pids(gw.log_path)[0]
        os.kill(killed, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while gw.log_path.read_text().count("listening host=") < 4:
            assert time.monotonic() < deadline, gw.log_path.read_text()
            await asyncio.sleep(0.05)
        lost = [
            i for i, ws in enumerate(sockets) if ws.close_code is not None or not await alive(ws)
        ]
        assert 0 < len(lost) < 36
        for i in lost:
            sockets[i] = await connect(url(gw.port)).__aenter__()
            await hello(sockets[i], callers[i])
            assert (await turn(sockets[i], "t2", form={"n": 2}))["version"] == 2
        for seen in [await scrape(gw.port) for _ in range(6)]:
            assert seen[applied] == 36 + len(lost), seen
            assert seen[active] == 36
        for ws in sockets:
            await ws.close()


async def alive(ws: ClientConnection) -> bool:
    """Whether a connection still answers a ping (a killed worker's do not)."""
    try:
        pong = await ws.ping()
        await asyncio.wait_for(pong, 2)
    except (ConnectionClosed, TimeoutError):
        return False
    return True
