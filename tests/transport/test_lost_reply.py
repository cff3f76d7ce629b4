"""A turn whose write landed but whose reply was lost (a timeout after the script ran) is
retried, recognised as this very write, acked and adopted: the next turn is not a conflict.

The store is real; a thin wrapper loses the first reply, as a dropped Redis connection would.
"""

from __future__ import annotations

from typing import Any

from gateway.exceptions import StoreTimeout
from gateway.store.base import StoreSettings, Written
from tests.support.clock import Clock
from tests.support.gateways import GatewayFactory
from tests.support.stores import StoreFactory
from tests.support.storewrap import Wrapper
from tests.support.wsclient import connect, hello, turn, url

PHONE = {"phone": "+14155550100", "call_id": "call-lost"}


class LoseFirstWriteReply(Wrapper):
    """Delegates to a real store; the first write_turn is applied, then its reply is 'lost'."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.lost = False

    async def write_turn(self, caller: Any, session_id: Any, write: Any) -> Written:
        result: Written = await self.inner.write_turn(caller, session_id, write)
        if not self.lost:
            self.lost = True
            raise StoreTimeout("write_turn", "reply lost after the script ran")
        return result


async def test_turn_after_lost_reply_is_not_a_conflict(
    make_gateway: GatewayFactory, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> None:
    """The retried write is adopted; the next turn is applied at the next version."""
    store = LoseFirstWriteReply(make_store(settings))
    async with make_gateway(store=store, clock=clock, delays=lambda: [0.01, 0.02]) as gw:
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
