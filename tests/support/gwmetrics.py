"""Reading a gateway's metrics in tests."""

from __future__ import annotations

import asyncio

from gateway.server import Gateway

__all__ = ["errors", "restores", "sample", "settled"]


def sample(gw: Gateway, name: str, **labels: str) -> float:
    """The value of the sample ``name`` with ``labels`` in the gateway's registry; 0 if none."""
    return gw.metrics.registry.get_sample_value(name, labels) or 0.0


def errors(gw: Gateway, code: str) -> float:
    return sample(gw, "hangon_protocol_errors_total", code=code)


async def settled(gw: Gateway) -> None:
    """Wait until the gateway has finished with every connection (close handling included)."""
    for _ in range(500):
        if not gw.metrics.registry.get_sample_value("hangon_connection_active"):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("connections still open on the gateway")


def restores(gw: Gateway, outcome: str) -> float:
    return sample(gw, "hangon_session_restores_total", outcome=outcome)
