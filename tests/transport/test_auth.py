"""Signed client tokens, tenant isolation and the Origin allowlist, tried against a live
gateway: each refusal gets its error frame, close code and metric, and nothing leaks."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.exceptions import InvalidStatus

from gateway.config import Config
from gateway.core.auth import parse_auth_keys
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from tests.support.authkeys import keys_document, token
from tests.support.gateways import GatewayFactory
from tests.support.gwmetrics import errors
from tests.support.stores import StoreFactory
from tests.support.wsclient import closed, connect, hello, send, turn, url

ADA = {"phone": "+14155550100", "call_id": "CA1"}
BOB = {"phone": "+14155550199", "call_id": "CA2"}


pytestmark = pytest.mark.stores("memory", "redis")


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, config: Config, settings: StoreSettings, make_store: StoreFactory
) -> AsyncIterator[Gateway]:
    """A gateway that requires tokens of four tenants and allows one browser origin."""
    cfg = config.replace(
        "security",
        auth_keys=parse_auth_keys(keys_document()),
        allowed_origins=("https://app.example.com",),
    )
    async with make_gateway(cfg, store=make_store(settings), delays=lambda: [0.01]) as gw:
        yield gw


def auth_failures(gw: Gateway, reason: str) -> float:
    value = gw.metrics.registry.get_sample_value("hangon_auth_failures_total", {"reason": reason})
    return value or 0.0


async def refused(gw: Gateway, caller: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """Say hello and return the error frame, checking the close that follows."""
    async with connect(url(gw.port)) as ws:
        await send(ws, {"type": "hello", "caller": caller, **fields})
        result = await closed(ws)
    assert result.code == 1008 and result.error is not None
    assert result.error["close_code"] == 1008 and result.error["reconnect"] is False
    return result.error


async def test_hello_without_a_valid_token_is_refused(gateway: Gateway) -> None:
    """No token, a forged one or an expired one: error frame, close 1008, counted by reason."""
    assert (await refused(gateway, ADA, tenant="acme"))["code"] == "auth_failed"
    forged = token(ADA)[:-6] + "AAAAAA"
    assert (await refused(gateway, ADA, tenant="acme", token=forged))["code"] == "auth_failed"
    expired = await refused(gateway, ADA, tenant="acme", token=token(ADA, ttl=-120))
    assert expired["code"] == "token_expired"
    assert auth_failures(gateway, "missing_token") == 1
    assert auth_failures(gateway, "bad_signature") == 1
    assert auth_failures(gateway, "expired_token") == 1
    assert errors(gateway, "auth_failed") == 2 and errors(gateway, "token_expired") == 1
    # Nothing was opened: the caller's first real hello finds no session.
    async with connect(url(gateway.port)) as ws:
        welcome = await hello(ws, ADA, tenant="acme", token=token(ADA))
    assert welcome["type"] == "welcome" and welcome["resumed"] is False


@pytest.mark.parametrize("tenant", ["acme", "initech", "umbrella"])
async def test_token_in_hello_query_or_subprotocol(gateway: Gateway, tenant: str) -> None:
    """A token opens the session from the hello, the query string or a subprotocol (HS256,
    RS256 and ES256 keys alike); the subprotocol answer is hangon.v1."""
    raw = token(ADA, tenant=tenant)
    async with connect(url(gateway.port)) as ws:
        assert (await hello(ws, ADA, tenant=tenant, token=raw))["type"] == "welcome"
        await turn(ws, "t1", form={"name": "Ada"})
    async with connect(url(gateway.port) + f"?token={raw}") as ws:
        welcome = await hello(ws, ADA, tenant=tenant)
        assert welcome["version"] == 1
    offers = ["hangon.v1", f"hangon.token.{raw}"]
    async with connect(url(gateway.port), subprotocols=offers) as ws:  # type: ignore[arg-type]
        assert ws.subprotocol == "hangon.v1"
        assert (await hello(ws, ADA, tenant=tenant))["version"] == 1


async def test_a_token_binds_its_caller(gateway: Gateway) -> None:
    """Ada's token does not open Bob's session, nor another call of Ada's."""
    assert (await refused(gateway, BOB, tenant="acme", token=token(ADA)))["code"] == "auth_failed"
    other_call = {**ADA, "call_id": "CA9"}
    await refused(gateway, other_call, tenant="acme", token=token(ADA))
    assert auth_failures(gateway, "wrong_caller") == 2


async def test_call_bound_token_resumes_and_subject_token_needs_the_resume_token(
    gateway: Gateway,
) -> None:
    """A token naming the call resumes without the resume token; one naming only the number
    opens new calls but resumes one only with its resume token."""
    async with connect(url(gateway.port)) as ws:
        first = await hello(ws, ADA, tenant="acme", token=token(ADA))
        await turn(ws, "t1", form={"name": "Ada"})
    async with connect(url(gateway.port)) as ws:
        again = await hello(ws, ADA, tenant="acme", token=token(ADA))
        assert (again["resumed"], again["version"]) == (True, 1)
    subject = token({"phone": "+14155550100"})
    async with connect(url(gateway.port)) as ws:
        await send(ws, {"type": "hello", "caller": ADA, "tenant": "acme", "token": subject})
        result = await closed(ws)
    assert result.code == 4501 and result.error is not None
    assert "resume token" in result.error["message"]
    async with connect(url(gateway.port)) as ws:
        resumed = await hello(
            ws, ADA, tenant="acme", token=subject, resume_token=again["resume_token"]
        )
        assert (resumed["resumed"], resumed["version"]) == (True, 1)
    new_call = {**ADA, "call_id": "CA5"}
    async with connect(url(gateway.port)) as ws:
        fresh = await hello(ws, new_call, tenant="acme", token=subject)
        assert (fresh["resumed"], fresh["version"]) == (False, 0)
    assert first["session_id"] == again["session_id"] == resumed["session_id"]


async def test_no_tenant_can_reach_another_tenants_session(gateway: Gateway) -> None:
    """Tenant globex cannot read, resume, overwrite or detect acme's session for the same
    number and call ID: not with its own token, acme's resume token, or a token acme's key
    signed for globex."""
    async with connect(url(gateway.port)) as ws:
        acme = await hello(ws, ADA, tenant="acme", token=token(ADA))
        await turn(ws, "t1", form={"name": "Ada", "dob": "1815-12-10"})
    # globex with its own valid token: a new, empty session of its own, as if acme had none.
    async with connect(url(gateway.port)) as ws:
        globex = await hello(
            ws, ADA, tenant="globex", token=token(ADA, tenant="globex"), last_seq=0
        )
        assert (globex["resumed"], globex["version"], globex["state"]["form_answers"]) == (
            False,
            0,
            {},
        )
        assert globex["session_id"] != acme["session_id"]
        await turn(ws, "g1", form={"name": "Mallory"})
    # ... and with acme's resume token: its own session refuses a token that is not its own,
    # exactly as it would any wrong token; acme's is never looked at.
    async with connect(url(gateway.port)) as ws:
        again = await hello(
            ws,
            ADA,
            tenant="globex",
            token=token(ADA, tenant="globex"),
            resume_token=acme["resume_token"],
        )
    assert again["code"] == "resume_refused"
    # globex's token on an acme hello, and acme's key signing for globex: refused.
    await refused(gateway, ADA, tenant="acme", token=token(ADA, tenant="globex"))
    await refused(gateway, ADA, tenant="globex", token=token(ADA, tenant="globex", kid="acme-1"))
    assert auth_failures(gateway, "wrong_tenant") == 2
    # acme's session is as acme left it.
    async with connect(url(gateway.port)) as ws:
        back = await hello(ws, ADA, tenant="acme", token=token(ADA))
    assert back["session_id"] == acme["session_id"]
    assert (back["version"], back["state"]["form_answers"]) == (
        1,
        {"name": "Ada", "dob": "1815-12-10"},
    )


async def test_origin_allowlist(gateway: Gateway) -> None:
    """A browser upgrade from another Origin gets 403 and is counted; the allowed origin and
    clients that send no Origin connect."""
    with pytest.raises(InvalidStatus) as caught:
        async with connect(url(gateway.port), origin="https://evil.example"):  # type: ignore[arg-type]
            pass
    assert caught.value.response.status_code == 403
    assert auth_failures(gateway, "origin") == 1
    async with connect(url(gateway.port), origin="https://app.example.com") as ws:  # type: ignore[arg-type]
        assert (await hello(ws, ADA, tenant="acme", token=token(ADA)))["type"] == "welcome"
    async with connect(url(gateway.port)) as ws:
        assert (await hello(ws, BOB, tenant="acme", token=token(BOB)))["type"] == "welcome"


async def test_a_replayed_resume_token_is_refused_and_counted(gateway: Gateway) -> None:
    """Every welcome carries a new resume token; once the client has used the new one, the
    old one is refused (resume_refused, 4501) and counted as a replay."""
    subject = token({"phone": "+14155550100"})  # resumes need the resume token
    async with connect(url(gateway.port)) as ws:
        first = await hello(ws, ADA, tenant="acme", token=subject)
        await turn(ws, "t1", form={"name": "Ada"})
    async with connect(url(gateway.port)) as ws:
        second = await hello(
            ws, ADA, tenant="acme", token=subject, resume_token=first["resume_token"]
        )
        assert second["resumed"] and second["resume_token"] != first["resume_token"]
    async with connect(url(gateway.port)) as ws:
        third = await hello(
            ws, ADA, tenant="acme", token=subject, resume_token=second["resume_token"]
        )
        assert third["resumed"]
    async with connect(url(gateway.port)) as ws:
        await send(
            ws,
            {
                "type": "hello",
                "caller": ADA,
                "tenant": "acme",
                "token": subject,
                "resume_token": first["resume_token"],
            },
        )
        result = await closed(ws)
    assert result.code == 4501 and result.error is not None
    assert result.error["message"] == "this resume token was replaced by a newer one"
    assert auth_failures(gateway, "resume_token_replayed") == 1
