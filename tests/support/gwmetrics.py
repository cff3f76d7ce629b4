"""Reading a gateway's metrics in tests."""

from __future__ import annotations

import asyncio

from gateway.server import Gateway

__all__ = ["errors", "restores", "settled"]


def errors(gw: Gateway, code: str) -> float:
    value = gw.metrics.registry.get_sample_value("hangon_protocol_errors_total", {"code": code})
    return value or 0.0


async def settled(gw: Gateway) -> None:
    """Wait until the gateway has finished with every connection (close handling included)."""
    for _ in range(500):
        if not gw.metrics.registry.get_sample_value("hangon_connection_active"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("connections still open on the gateway")


def restores(gw: Gateway, outcome: str) -> float:
    value = gw.metrics.registry.get_sample_value(
        "hangon_session_restores_total", {"outcome": outcome}
    )
    return value or 0.0
