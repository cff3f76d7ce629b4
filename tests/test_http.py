"""HTTP on the WebSocket port: probes, metrics, and everything else is 404."""

from __future__ import annotations

from gateway.server import Gateway
from tests.support.httpget import get
from tests.support.wsclient import connect, hello, turn, url


async def test_healthz_and_readyz(gateway: Gateway) -> None:
    """/healthz and /readyz answer 200 while the store answers."""
    assert (await get(gateway.port, "/healthz"))[:2] == (200, b"ok\n")
    assert (await get(gateway.port, "/readyz"))[:2] == (200, b"ready\n")


async def test_unknown_path_is_404(gateway: Gateway) -> None:
    """Paths other than the endpoint, probes and static files are 404; / is the demo page,
    pointed at the WebSocket path."""
    assert (await get(gateway.port, "/nope"))[0] == 404
    status, body, headers = await get(gateway.port, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b'<meta name="hangon-path" content="/ws">' in body


async def test_plain_get_on_endpoint_is_426(gateway: Gateway) -> None:
    """A plain GET on the WebSocket path is told to upgrade."""
    assert (await get(gateway.port, "/ws"))[0] == 426


async def test_metrics(gateway: Gateway) -> None:
    """/metrics is Prometheus text and counts restores, turns, write latency and sessions."""
    async with connect(url(gateway.port)) as ws:
        await hello(ws, {"user_id": "u", "call_id": "m"})
        await turn(ws, "t1", form={"a": 1})
        status, body, headers = await get(gateway.port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=")
    text = body.decode()
    assert 'hangon_session_restores_total{outcome="miss"} 1.0' in text
    assert 'hangon_session_restores_total{outcome="stale"} 0.0' in text
    assert 'hangon_session_turns_total{outcome="applied"} 1.0' in text
    assert 'hangon_store_op_seconds_count{op="write_turn"} 1.0' in text
    assert "hangon_session_active 1.0" in text
    assert "hangon_store_errors_total" in text
    assert 'hangon_protocol_errors_total{code="invalid_json"} 0.0' in text


async def test_serves_the_browser_client(gateway: Gateway) -> None:
    """/client.js and /client.d.ts are the files in gateway/static, with their types."""
    from pathlib import Path

    static = Path(__file__).parent.parent / "gateway" / "static"
    status, body, headers = await get(gateway.port, "/client.js")
    assert status == 200 and headers["content-type"].startswith("text/javascript")
    assert body == (static / "client.js").read_bytes()
    status, body, _ = await get(gateway.port, "/client.d.ts")
    assert status == 200 and body == (static / "client.d.ts").read_bytes()
