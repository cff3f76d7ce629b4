"""Two gateway instances on one Redis: a connection whose copy fell behind cannot overwrite
newer state; it is told to resume and then sees everything."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.server import Gateway
from tests.wsclient import closed, connect, hello, send, turn, url

CALLER = {"user_id": "u-two", "call_id": "c-1"}


@pytest.fixture
async def pair(config: Config, redis_url: str) -> AsyncIterator[tuple[Gateway, Gateway]]:
    cfg = config.replace("store", redis_url=redis_url)
    async with Gateway(cfg, metrics=Metrics()) as a, Gateway(cfg, metrics=Metrics()) as b:
        yield a, b


async def test_stale_copy_cannot_overwrite(pair: tuple[Gateway, Gateway]) -> None:
    """A turn applied through instance A is acked by B with A's version and not applied
    again; B's next turn, based on its old copy, is refused with 4003; B's client resumes
    and sees both turns."""
    a, b = pair
    async with connect(url(a.port)) as on_a, connect(url(b.port)) as on_b:
        welcome = await hello(on_a, CALLER)
        assert (await hello(on_b, CALLER))["session_id"] == welcome["session_id"]
        assert (await turn(on_a, "t1", form={"name": "Ada"}))["version"] == 1
        # B's copy is at version 0; the same turn ID through B is recognised, not re-applied.
        assert await turn(on_b, "t1", form={"name": "Ada"}) == {
            "type": "ack",
            "turn_id": "t1",
            "version": 1,
        }
        await send(on_b, {"type": "turn", "turn_id": "t2", "form": {"name": "Bob"}})
        result = await closed(on_b)
    assert result.code == 4003
    assert result.error is not None and result.error["code"] == "session_conflict"
    assert result.error["reconnect"] is True
    async with connect(url(b.port)) as on_b:
        again = await hello(on_b, CALLER, resume_token=welcome["resume_token"])
        assert again["version"] == 1
        assert again["state"]["form_answers"] == {"name": "Ada"}
        assert (await turn(on_b, "t2", form={"name": "Bob"}))["version"] == 2
