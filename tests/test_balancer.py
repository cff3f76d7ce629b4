"""Three gateway processes behind a real HAProxy or nginx (round robin, no stickiness, the
configs in deploy/) with the demo agent in a process of its own and 200 callers streaming turns:
SIGKILL one gateway, then restart all three one by one with SIGTERM. Every caller resumes
each time with every acknowledged answer, no turn is applied twice and every agent message
arrives exactly once."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from tests.support.balancer import HAProxy, Nginx, ensure_haproxy, ensure_nginx
from tests.support.gateway_process import GatewayProcess
from tests.support.httpget import get
from tests.support.redis_server import RedisServer, free_port
from tests.support.streamer import Streamer

pytestmark = pytest.mark.slow

CALLERS = int(os.environ.get("HANGON_TEST_CALLERS", "200"))


@pytest.fixture(params=["haproxy", "nginx"])
def balancer(request: pytest.FixtureRequest) -> type[HAProxy] | type[Nginx]:
    """The balancer class, once its binary is there (installed with apt when root)."""
    if request.param == "haproxy":
        if ensure_haproxy() is None:
            pytest.skip("haproxy not found: apt-get install haproxy")
        return HAProxy
    if ensure_nginx() is None:
        pytest.skip("nginx not found: apt-get install nginx")
    return Nginx


async def ready(port: int, timeout: float = 10) -> None:
    """Wait until the gateway on ``port`` answers /readyz with 200."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            if (await get(port, "/readyz"))[0] == 200:
                return
        except OSError:
            pass
        assert loop.time() < deadline, f"gateway on {port} not ready"
        await asyncio.sleep(0.05)


def gateway(
    tmp_path: Path, n: int, port: int, redis: RedisServer, agent_port: int
) -> GatewayProcess:
    proc = GatewayProcess(
        tmp_path / f"gateway{n}.log",
        "--redis-url",
        redis.url,
        "--downstream",
        f"ws://127.0.0.1:{agent_port}/",
        "--drain-period",
        "2",
        "--instance-id",
        f"g{n}",
        port=port,
    )
    proc.start()
    return proc


async def progress(callers: list[Streamer], turns: int, timeout: float = 30) -> None:
    """Wait until every caller has had ``turns`` more turns acknowledged."""
    goal = [len(c.acked) + turns for c in callers]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while any(len(c.acked) < g for c, g in zip(callers, goal, strict=True)):
        behind = [c.name for c, g in zip(callers, goal, strict=True) if len(c.acked) < g]
        assert loop.time() < deadline, f"{len(behind)} callers stalled, e.g. {behind[:3]}"
        await asyncio.sleep(0.2)


async def test_kill_and_rolling_restart_behind_a_balancer(
    tmp_path: Path,
    own_redis: RedisServer,
    demo_agent: GatewayProcess,
    balancer: type[HAProxy] | type[Nginx],
) -> None:
    """SIGKILL of one of three gateways, then a rolling SIGTERM restart of all three, with
    200 callers streaming through the balancer: nothing acked is lost, nothing applied
    twice, every agent message arrives once, and each SIGTERM exits 0."""
    ports = [free_port() for _ in range(3)]
    gateways = [gateway(tmp_path, n, p, own_redis, demo_agent.port) for n, p in enumerate(ports, 1)]
    runs: list[asyncio.Task[None]] = []
    try:
        with balancer(tmp_path / "balancer", ports) as lb:
            callers = [
                Streamer(f"{lb.url}/ws", {"user_id": f"u{i}", "call_id": "lb"}, pace=0.5)
                for i in range(CALLERS)
            ]
            runs += [asyncio.create_task(c.run()) for c in callers]
            await progress(callers, 3)

            welcomes = sum(c.welcomes for c in callers)
            await asyncio.to_thread(gateways[0].kill)
            await progress(callers, 3)
            moved = sum(c.welcomes for c in callers) - welcomes
            # Round robin put about a third of the callers on the killed gateway.
            assert moved >= CALLERS // 6, moved
            gateways[0] = gateway(tmp_path, 1, ports[0], own_redis, demo_agent.port)
            await ready(ports[0])
            if isinstance(lb, HAProxy):
                await asyncio.to_thread(lb.wait_state, "g1", "UP", 10)

            for n in range(3):
                welcomes = sum(c.welcomes for c in callers)
                assert await asyncio.to_thread(gateways[n].terminate, 20) == 0
                gateways[n] = gateway(tmp_path, n + 1, ports[n], own_redis, demo_agent.port)
                await ready(ports[n])
                if isinstance(lb, HAProxy):
                    await asyncio.to_thread(lb.wait_state, f"g{n + 1}", "UP", 10)
                await progress(callers, 2)
                if n > 0:  # the first one, restarted after the kill, was serving nobody
                    assert sum(c.welcomes for c in callers) - welcomes >= CALLERS // 6

            for c in callers:
                c.stop()
            await asyncio.wait_for(asyncio.gather(*runs), 60)
            await asyncio.gather(*(c.verify() for c in callers))
    finally:
        for run in runs:
            run.cancel()
        for g in gateways:
            if g.proc is not None and g.proc.poll() is None:
                g.kill()
    problems = [p for c in callers for p in c.problems]
    assert problems == [], problems[:10]
    assert all(c.messages > 0 for c in callers)
    # Drained and killed connections only: nobody was told to stay away.
    codes = {code for c in callers for code in c.closes}
    assert codes <= {1012, None, 4003}, codes
    assert sum(c.closes[1012] for c in callers) >= CALLERS // 2
    for c in callers:
        assert sorted(c.answers) == sorted(f"k{n}" for n in range(1, len(c.acked) + 1))
