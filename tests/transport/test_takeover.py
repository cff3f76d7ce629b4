"""A reconnect takes its session over from an older connection on the same instance, even one
that is half-open, and of several racing reconnects exactly one keeps the session."""

from __future__ import annotations

from gateway.server import Gateway
from tests.wsclient import connect, hello, recv, send, url

PHONE = {"phone": "+14155550100", "call_id": "call-takeover"}


async def test_takeover_of_half_open_connection_does_not_wait(gateway: Gateway) -> None:
    """The welcome is sent while the half-open old connection is still being closed."""
    async with connect(url(gateway.port)) as old:
        welcome = await hello(old, PHONE)
        old.transport.pause_reading()  # the old client is gone: it answers nothing any more
        async with connect(url(gateway.port)) as new:
            again = await hello(new, PHONE, resume_token=welcome["resume_token"])
            # Closing the old one waits for a close frame that will not come (close_timeout).
            still_closing = len(gateway.context.closing)
        old.transport.resume_reading()
    assert again["type"] == "welcome" and again["resumed"] is True
    assert still_closing == 1


async def test_racing_takeovers_leave_one_connection(gateway: Gateway) -> None:
    """Two reconnects racing for a session: the last one keeps it, the other is told 4500."""
    async with connect(url(gateway.port)) as old:
        welcome = await hello(old, PHONE)
        token = welcome["resume_token"]
        old.transport.pause_reading()
        async with connect(url(gateway.port)) as b, connect(url(gateway.port)) as c:
            await send(b, {"type": "hello", "caller": PHONE, "resume_token": token})
            assert (await recv(b))["type"] == "welcome"
            await send(c, {"type": "hello", "caller": PHONE, "resume_token": token})
            assert (await recv(c))["type"] == "welcome"
            replaced = await recv(b)
            live = [s.ws for s in gateway.context.live.values()]
            assert len(live) == 1
        old.transport.resume_reading()
    assert replaced["type"] == "error" and replaced["code"] == "session_replaced"
