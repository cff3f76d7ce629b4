"""Token keys and tokens for tests: one HMAC tenant, one RSA tenant, one P-256 tenant."""

from __future__ import annotations

import base64
import functools
import time
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway.core import codec

__all__ = ["ACME_SECRET", "keys_document", "private_keys", "token"]

ACME_SECRET = bytes(range(7, 39))
"""Tenant ``acme``'s HS256 secret (kid ``acme-1``)."""
GLOBEX_SECRET = bytes(range(50, 82))
"""Tenant ``globex``'s HS256 secret (kid ``globex-1``)."""


@functools.cache
def private_keys() -> dict[str, Any]:
    """Tenant ``initech``'s RSA key (kid ``initech-rsa``) and ``umbrella``'s P-256 key
    (kid ``umbrella-ec``)."""
    return {
        "initech-rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "umbrella-ec": ec.generate_private_key(ec.SECP256R1()),
    }


def _pem(key: Any) -> str:
    return str(
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def keys_document() -> str:
    """The ``--auth-keys`` JSON for the four tenants."""
    keys = private_keys()
    return codec.dumps(
        {
            "keys": [
                {
                    "kid": "acme-1",
                    "tenant": "acme",
                    "alg": "HS256",
                    "secret": base64.b64encode(ACME_SECRET).decode(),
                },
                {
                    "kid": "globex-1",
                    "tenant": "globex",
                    "alg": "HS256",
                    "secret": base64.b64encode(GLOBEX_SECRET).decode(),
                },
                {
                    "kid": "initech-rsa",
                    "tenant": "initech",
                    "alg": "RS256",
                    "public_key": _pem(keys["initech-rsa"]),
                },
                {
                    "kid": "umbrella-ec",
                    "tenant": "umbrella",
                    "alg": "ES256",
                    "public_key": _pem(keys["umbrella-ec"]),
                },
            ]
        }
    ).decode()


def token(
    caller: dict[str, Any],
    *,
    tenant: str = "acme",
    kid: str | None = None,
    ttl: float = 300.0,
    **claims: Any,
) -> str:
    """A token for ``caller`` signed with ``kid`` (by default the tenant's own key)."""
    kid = (
        kid
        or {
            "acme": "acme-1",
            "globex": "globex-1",
            "initech": "initech-rsa",
            "umbrella": "umbrella-ec",
        }[tenant]
    )
    payload = {"tenant": tenant, "caller": caller, "exp": int(time.time() + ttl), **claims}
    if kid == "acme-1":
        return jwt.encode(payload, ACME_SECRET, "HS256", headers={"kid": kid})
    if kid == "globex-1":
        return jwt.encode(payload, GLOBEX_SECRET, "HS256", headers={"kid": kid})
    alg = "RS256" if kid == "initech-rsa" else "ES256"
    return jwt.encode(payload, private_keys()[kid], alg, headers={"kid": kid})
