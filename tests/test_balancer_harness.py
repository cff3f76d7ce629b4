"""The shipped HAProxy and nginx configs: WebSockets pass through, connections alternate
between gateways with no stickiness, and a gateway answering 503 gets no new ones."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from tests.support.balancer import EchoBackend, HAProxy, Nginx, ensure_haproxy, ensure_nginx


@pytest.fixture
async def backends() -> AsyncIterator[tuple[EchoBackend, EchoBackend]]:
    async with EchoBackend("a") as a, EchoBackend("b") as b:
        yield a, b


@pytest.fixture(params=["haproxy", "nginx"])
async def balancer(
    request: pytest.FixtureRequest, backends: tuple[EchoBackend, ...], tmp_path: Path
) -> AsyncIterator[HAProxy | Nginx]:
    kind = request.param
    found = await asyncio.to_thread(ensure_haproxy if kind == "haproxy" else ensure_nginx)
    if found is None:
        pytest.skip(f"{kind} not found: apt-get install {kind}")
    cls = HAProxy if kind == "haproxy" else Nginx
    lb = cls(tmp_path / kind, [b.port for b in backends])
    await asyncio.to_thread(lb.start)
    yield lb
    await asyncio.to_thread(lb.stop)


async def landing(lb: HAProxy | Nginx) -> str:
    """Open a WebSocket through the balancer and return the name of the backend it reached."""
    async with connect(lb.url + "/ws", open_timeout=5) as ws:
        name = await asyncio.wait_for(ws.recv(), 5)
    assert isinstance(name, str)
    return name


async def test_websocket_passes_through(balancer: HAProxy | Nginx) -> None:
    """A WebSocket opened through the balancer reaches a backend and echoes."""
    async with connect(balancer.url + "/ws", open_timeout=5) as ws:
        assert await asyncio.wait_for(ws.recv(), 5) in ("a", "b")
        await ws.send("hello")
        assert await asyncio.wait_for(ws.recv(), 5) == "hello"


async def test_connections_alternate(balancer: HAProxy | Nginx) -> None:
    """Consecutive connections go to one backend, then the other: round robin, no stickiness."""
    names = [await landing(balancer) for _ in range(6)]
    assert set(names) == {"a", "b"}
    assert all(x != y for x, y in zip(names, names[1:], strict=False)), names


async def test_draining_backend_gets_no_connections(
    balancer: HAProxy | Nginx, backends: tuple[EchoBackend, EchoBackend]
) -> None:
    """Once a backend answers 503, every new connection goes to the other one at once."""
    a, _ = backends
    a.ready = False
    names = [await landing(balancer) for _ in range(6)]
    assert names == ["b"] * 6
    if isinstance(balancer, HAProxy):
        await asyncio.to_thread(balancer.wait_state, "g1", "DOWN", 5)
        assert balancer.server_states() == {"g1": "DOWN", "g2": "UP"}


async def test_stopped_backend_gets_no_connections(
    balancer: HAProxy | Nginx, backends: tuple[EchoBackend, EchoBackend]
) -> None:
    """Once a backend refuses connections, every new connection goes to the other one at once."""
    a, _ = backends
    await a.aclose()
    names = [await landing(balancer) for _ in range(6)]
    assert names == ["b"] * 6
