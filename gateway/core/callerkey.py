"""Caller keys: who is calling, normalised so that every reconnect finds the same session.

A caller is ``{"phone": ..., "call_id": ...}`` or ``{"user_id": ..., "call_id": ...}``
within a tenant. Phone numbers are normalised to E.164 with ``phonenumbers`` so
that ``+1 (415) 555-0100`` and ``+14155550100`` are the same caller.

Storage and logs never see the raw identity: they carry its keyed digest
(:meth:`gateway.core.sealing.Keyring.digest`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import phonenumbers

from gateway.exceptions import InvalidInput

__all__ = ["DEFAULT_TENANT", "CallerKey", "InvalidCaller", "parse_caller", "validate_tenant"]

DEFAULT_TENANT = "default"
"""Tenant of a caller whose hello names none."""

_TENANT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_MAX_ID = 128


class InvalidCaller(InvalidInput, ValueError):
    """The caller object is malformed; its ``code`` names the field at fault."""


@dataclass(frozen=True, slots=True)
class CallerKey:
    """A normalised caller identity."""

    tenant: str
    kind: Literal["phone", "user"]
    subject: str
    """E.164 phone number or user ID."""
    call_id: str


def validate_tenant(tenant: object) -> str:
    """Return ``tenant`` if it is a valid tenant name.

    Tenant names go into storage keys, so they are restricted to 1-64 characters
    of ``[A-Za-z0-9_.-]`` starting with a letter or digit.

    Raises:
        InvalidCaller: If it is not.
    """
    if not isinstance(tenant, str) or not _TENANT_RE.fullmatch(tenant):
        raise InvalidCaller("tenant", "must be 1-64 characters of A-Z a-z 0-9 _ . -")
    return tenant


def _identifier(caller: dict[str, Any], field: str) -> str:
    value = caller.get(field)
    if not isinstance(value, str) or not value or len(value) > _MAX_ID:
        raise InvalidCaller(field, f"must be a non-empty string of at most {_MAX_ID} characters")
    return value


def _e164(number: object, default_region: str | None) -> str:
    if not isinstance(number, str) or not number or len(number) > 64:
        raise InvalidCaller("phone", "must be a non-empty string")
    try:
        parsed = phonenumbers.parse(number, default_region)
    except phonenumbers.NumberParseException as exc:
        raise InvalidCaller("phone", f"not a phone number: {exc}") from exc
    if not phonenumbers.is_valid_number(parsed):
        raise InvalidCaller("phone", "not a valid phone number")
    return str(phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164))


def parse_caller(
    caller: object, tenant: object = None, *, default_region: str | None = None
) -> CallerKey:
    """Validate and normalise a caller object from a ``hello``.

    Args:
        caller: The ``caller`` field of the hello.
        tenant: The hello's top-level ``tenant`` field, if any; a ``tenant``
            inside ``caller`` is accepted too, and the two must agree.
        default_region: ISO 3166 region for numbers written without ``+``
            (``None`` requires international format).

    Raises:
        InvalidCaller: If the caller is malformed or the number is not valid.
    """
    if not isinstance(caller, dict):
        raise InvalidCaller("caller", "must be an object")
    inner = caller.get("tenant")
    if tenant is not None and inner is not None and tenant != inner:
        raise InvalidCaller("tenant", "hello.tenant and caller.tenant disagree")
    chosen = tenant if tenant is not None else inner
    tenant_name = DEFAULT_TENANT if chosen is None else validate_tenant(chosen)
    call_id = _identifier(caller, "call_id")
    has_phone = "phone" in caller
    if has_phone == ("user_id" in caller):
        raise InvalidCaller("caller", "needs exactly one of phone and user_id")
    if has_phone:
        return CallerKey(tenant_name, "phone", _e164(caller["phone"], default_region), call_id)
    return CallerKey(tenant_name, "user", _identifier(caller, "user_id"), call_id)
