"""An agent link that fails unexpectedly is supervised: logged once with its session, its
connection closed and its gauge back, and not redialled into the same failure."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

import pytest

from gateway.metrics import Metrics
from gateway.transport.downstream import AgentLink, Inbox
from tests.support.agents import TestAgent


def _no_delay() -> Iterator[float]:
    while True:
        yield 0.01


async def test_a_link_whose_opening_fails_is_released_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A link whose opening frame cannot be built (here a bug; before the edge checks, a
    Twilio start nested 300 deep) logs the failure once with its session, closes its
    connection, puts hangon_agent_links_active back, counts the cut, and stops."""
    metrics = Metrics()

    def opening(reason: str) -> bytes:
        raise TypeError("Recursion limit reached")

    async with TestAgent() as agent:
        link = AgentLink(
            agent.url,
            opening=opening,
            reason="start",
            inbox=Inbox[object](max_size=1 << 20),
            take=lambda link, frame: frame,
            metrics=metrics,
            delays=_no_delay,
            max_size=65536,
            open_timeout=5,
            session_id="s_test",
        )
        with caplog.at_level(logging.ERROR, logger="gateway.downstream"):
            async with asyncio.timeout(5):
                while not agent.connections or agent.connections[0].state.name != "CLOSED":
                    await asyncio.sleep(0.02)
            await asyncio.sleep(0.3)  # no redial
            await link.stop()
    failures = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in failures] == ["agent link failed session=s_test"]
    assert len(agent.connections) == 1
    assert metrics.agent_links_active._value.get() == 0
    sample = metrics.registry.get_sample_value("hangon_agent_links_cut_total", {"reason": "error"})
    assert sample == 1
