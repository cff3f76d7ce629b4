"""A turn whose write landed but whose reply was lost (a timeout after the script ran) is
retried, recognised as this very write, acked and adopted: the next turn is not a conflict.

The store is real; a thin wrapper loses the first reply, as a dropped Redis connection would.
"""

from __future__ import annotations

from typing import Any

from gateway.config import Config
from gateway.exceptions import StoreTimeout
from gateway.metrics import Metrics
from gateway.server import Gateway
from gateway.store.base import StoreSettings, Written
from tests.conftest import Clock, StoreFactory
from tests.support.wsclient import connect, hello, turn, url

PHONE = {"phone": "+14155550100", "call_id": "call-lost"}


class LoseFirstWriteReply:
    """Delegates to a real store; the first write_turn is applied, then its reply is 'lost'."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name
        self.lost = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def write_turn(self, caller: Any, session_id: Any, write: Any) -> Written:
        result: Written = await self.inner.write_turn(caller, session_id, write)
        if not self.lost:
            self.lost = True
            raise StoreTimeout("write_turn", "reply lost after the script ran")
        return result


async def test_turn_after_lost_reply_is_not_a_conflict(
    config: Config, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> None:
    """The retried write is adopted; the next turn is applied at the next version."""
    store = LoseFirstWriteReply(make_store(settings))
    async with Gateway(
        config, store=store, metrics=Metrics(), clock=clock, delays=lambda: [0.01, 0.02]
    ) as gw:
        async with connect(url(gw.port)) as ws:
            await hello(ws, PHONE)
            assert await turn(ws, "t1", form={"a": 1}) == {
                "type": "ack",
                "turn_id": "t1",
                "version": 1,
            }
            # Nobody else wrote: the next turn should simply be applied at version 2.
            reply = await turn(ws, "t2", form={"b": 2})
        assert reply == {"type": "ack", "turn_id": "t2", "version": 2}, reply
