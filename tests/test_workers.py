"""``hangon serve --workers N``: N processes share one port (SO_REUSEPORT), each its own
instance; a crashed worker is started again, and SIGTERM drains them all and exits 0."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from websockets.exceptions import ConnectionClosed

from tests.support.gateway_process import GatewayProcess
from tests.support.redis_server import RedisServer, free_port
from tests.support.wsclient import connect, hello, recv, turn, url

pytestmark = pytest.mark.slow

_STARTED = re.compile(r"worker started index=(\d+) pid=(\d+)")


def worker_pids(log: Path) -> dict[int, int]:
    """The newest PID of each worker, from the supervisor's log."""
    return {int(i): int(pid) for i, pid in _STARTED.findall(log.read_text())}


@pytest.fixture
def workers(tmp_path: Path, own_redis: RedisServer) -> Iterator[GatewayProcess]:
    """``hangon serve --workers 2`` on a free port, both workers listening; killed after."""
    log = tmp_path / "workers.log"
    gw = GatewayProcess(
        log,
        "--workers",
        "2",
        "--redis-url",
        own_redis.url,
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
    while log.read_text().count("listening host=") < 2:  # both workers, not just one
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.05)
    yield gw
    assert gw.proc is not None
    if gw.proc.poll() is None:
        gw.kill()
    for pid in worker_pids(log).values():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


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
