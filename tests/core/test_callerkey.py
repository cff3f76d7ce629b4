"""Caller key normalisation."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.core.callerkey import DEFAULT_TENANT, CallerKey, InvalidCaller, parse_caller


def test_phone_formats_are_one_caller() -> None:
    """+1 (415) 555-0100 and +14155550100 normalise to the same key."""
    a = parse_caller({"phone": "+1 (415) 555-0100", "call_id": "c"})
    b = parse_caller({"phone": "+14155550100", "call_id": "c"})
    assert a == b == CallerKey(DEFAULT_TENANT, "phone", "+14155550100", "c")


def test_default_region_allows_national_numbers() -> None:
    """With a default region, a national number is read in that region."""
    key = parse_caller({"phone": "(415) 555-0100", "call_id": "c"}, default_region="US")
    assert key.subject == "+14155550100"
    with pytest.raises(InvalidCaller):
        parse_caller({"phone": "(415) 555-0100", "call_id": "c"})


def test_user_caller() -> None:
    """A user_id caller keeps its ID verbatim."""
    assert parse_caller({"user_id": "u-1", "call_id": "c"}, "acme") == CallerKey(
        "acme", "user", "u-1", "c"
    )


def test_tenant_inside_caller() -> None:
    """A tenant inside the caller object counts; one that disagrees with hello.tenant fails."""
    assert parse_caller({"user_id": "u", "call_id": "c", "tenant": "acme"}).tenant == "acme"
    assert parse_caller({"user_id": "u", "call_id": "c", "tenant": "a"}, "a").tenant == "a"
    with pytest.raises(InvalidCaller, match="disagree"):
        parse_caller({"user_id": "u", "call_id": "c", "tenant": "a"}, "b")


@pytest.mark.parametrize(
    ("caller", "tenant", "field"),
    [
        ({"phone": "+14155550100"}, None, "call_id"),
        ({"phone": "+14155550100", "call_id": ""}, None, "call_id"),
        ({"phone": "+14155550100", "call_id": 5}, None, "call_id"),
        ({"call_id": "c"}, None, "caller"),
        ({"phone": "+14155550100", "user_id": "u", "call_id": "c"}, None, "caller"),
        ({"phone": "not a number", "call_id": "c"}, None, "phone"),
        ({"phone": "+1 415 555 010", "call_id": "c"}, None, "phone"),
        ({"phone": 14155550100, "call_id": "c"}, None, "phone"),
        ({"phone": "", "call_id": "c"}, None, "phone"),
        ({"user_id": "", "call_id": "c"}, None, "user_id"),
        ({"user_id": "u" * 129, "call_id": "c"}, None, "user_id"),
        ({"user_id": "u", "call_id": "c"}, "bad tenant", "tenant"),
        ({"user_id": "u", "call_id": "c"}, "a:{b}", "tenant"),
        ({"user_id": "u", "call_id": "c"}, 5, "tenant"),
        ([], None, "caller"),
    ],
)
def test_invalid_callers(caller: Any, tenant: Any, field: str) -> None:
    """Malformed callers raise InvalidCaller naming the field."""
    with pytest.raises(InvalidCaller) as info:
        parse_caller(caller, tenant)
    assert info.value.code == field
    assert str(info.value).startswith(field + ":")
