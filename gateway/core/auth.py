"""Signed client tokens: who may open or resume which sessions.

A token is a JWT (PyJWT) signed by a key of one tenant: an HMAC secret
(``HS256``) or the public half of an RSA (``RS256``) or P-256 (``ES256``) key
pair whose private half stays with the tenant's backend. Its header names the
key (``kid``); its claims are::

    {"tenant": "acme",                                   # the key's tenant
     "caller": {"phone": "+14155550100", "call_id": "CA123"},  # or "user_id"
     "exp": 1800000000}                                  # required

A key signs for its own tenant only: a token naming another tenant is refused,
so one tenant's secret never opens another's sessions. ``caller`` binds what
the token may open: a hello for another caller is refused. With ``call_id``,
the token is bound to one caller key and may resume that session without its
resume token (a page reload that lost it). Without ``call_id``, it is bound to
the phone number or user ID only: it may open a new call, and resuming an
existing one needs the session's resume token as well.

Failures carry a reason from a closed set (:data:`REASONS`), a metrics label.
"""

from __future__ import annotations

import base64
import binascii
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from gateway.core import codec
from gateway.core.callerkey import CallerKey, InvalidCaller, parse_caller, validate_tenant
from gateway.exceptions import InvalidInput

__all__ = [
    "ALGORITHMS",
    "REASONS",
    "AuthError",
    "AuthKey",
    "Grant",
    "Verifier",
    "parse_auth_keys",
]

ALGORITHMS: Final = ("HS256", "RS256", "ES256")
"""What a key may sign with; one algorithm per key, so a token cannot pick another."""

REASONS: Final = (
    "missing_token",
    "malformed_token",
    "unknown_key",
    "bad_signature",
    "expired_token",
    "invalid_claims",
    "wrong_tenant",
    "wrong_caller",
)
"""Why a token was refused (``hangon_auth_failures_total{reason}``)."""

_MIN_SECRET = 32
_MAX_TOKEN = 8192
_ANY_CALL = "\x00any"
"""The call ID of a grant bound to a phone number or user ID only."""


class AuthError(InvalidInput):
    """A token was refused; its ``code`` is one of :data:`REASONS`."""


@dataclass(frozen=True, slots=True)
class AuthKey:
    """One tenant's token key."""

    kid: str
    tenant: str
    alg: str
    key: Any
    """The HMAC secret (bytes) or the public key object."""


@dataclass(frozen=True, slots=True)
class Grant:
    """What a verified token allows."""

    caller: CallerKey
    """The caller it is for; its ``call_id`` is meaningless unless :attr:`bound`."""
    bound: bool
    """Bound to one caller key (the token named a ``call_id``): it may resume that
    session without the session's resume token."""
    expires: int
    """When it stops being accepted (seconds since the epoch)."""

    def allows(self, caller: CallerKey) -> bool:
        """Whether a hello for ``caller`` may go ahead under this grant."""
        mine = self.caller
        return (
            caller.tenant == mine.tenant
            and caller.kind == mine.kind
            and caller.subject == mine.subject
            and (not self.bound or caller.call_id == mine.call_id)
        )


class Verifier:
    """Verifies tokens against the configured keys.

    A reconnecting client presents the token it connected with, so a reconnect storm
    presents every token a second time: tokens that verified are remembered (a bounded
    number, least recently used first out) and only their expiry is checked again.

    Args:
        keys: Every tenant's keys.
        leeway: Seconds of clock skew allowed on ``exp`` and ``nbf``.
        default_region: Region for phone numbers in tokens written without ``+``.
        cache: Verified tokens remembered at most.
        clock: Seconds since the epoch (tests pass their own).
    """

    def __init__(
        self,
        keys: Iterable[AuthKey],
        *,
        leeway: float = 30.0,
        default_region: str | None = None,
        cache: int = 20_000,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.keys = {key.kid: key for key in keys}
        self.leeway = leeway
        self.default_region = default_region
        self._cache: OrderedDict[str, Grant] = OrderedDict()
        self._cache_size = cache
        self._clock = clock

    def verify(self, token: str) -> Grant:
        """Check ``token``'s signature, expiry and claims.

        Raises:
            AuthError: Saying why it was refused.
        """
        grant = self._cache.get(token)
        if grant is not None:
            if grant.expires + self.leeway <= self._clock():
                del self._cache[token]
                raise AuthError("expired_token", "the token has expired; get a new one")
            self._cache.move_to_end(token)
            return grant
        grant = self._verify(token)
        self._cache[token] = grant
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return grant

    def _verify(self, token: str) -> Grant:
        if not token or len(token) > _MAX_TOKEN:
            raise AuthError("malformed_token", "the token is empty or too long")
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError:
            raise AuthError("malformed_token", "the token is not a JWT") from None
        key = self.keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise AuthError("unknown_key", "the token's kid names no configured key")
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[key.alg],
                options={"require": ["exp"]},
                leeway=self.leeway,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("expired_token", "the token has expired; get a new one") from None
        except (jwt.InvalidSignatureError, jwt.InvalidAlgorithmError):
            raise AuthError("bad_signature", "the token's signature does not verify") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError("invalid_claims", f"the token's claims are invalid: {exc}") from None
        return self._grant(key, claims)

    def _grant(self, key: AuthKey, claims: Mapping[str, Any]) -> Grant:
        tenant = claims.get("tenant", key.tenant)
        if tenant != key.tenant:
            # A key signs for its own tenant only.
            raise AuthError("wrong_tenant", "the token names a tenant its key does not sign for")
        caller = claims.get("caller")
        if not isinstance(caller, dict):
            raise AuthError("invalid_claims", "claim 'caller' must be an object")
        bound = "call_id" in caller
        try:
            key_of = parse_caller(
                caller if bound else {**caller, "call_id": _ANY_CALL},
                tenant,
                default_region=self.default_region,
            )
        except InvalidCaller as exc:
            raise AuthError("invalid_claims", f"claim 'caller': {exc}") from None
        return Grant(key_of, bound, int(claims["exp"]))


def parse_auth_keys(text: str) -> tuple[AuthKey, ...]:
    """Parse the keys document (JSON)::

        {"keys": [{"kid": "acme-1", "tenant": "acme", "alg": "HS256", "secret": "BASE64"},
                  {"kid": "globex-1", "tenant": "globex", "alg": "ES256",
                   "public_key": "-----BEGIN PUBLIC KEY-----\\n..."}]}

    Raises:
        ValueError: Naming the entry and what is wrong with it.
    """
    try:
        doc = codec.loads(text)
    except codec.DecodeError as exc:
        raise ValueError(f"not JSON: {exc}") from None
    entries = doc.get("keys") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError('must be {"keys": [...]} with at least one key')
    keys: list[AuthKey] = []
    for n, entry in enumerate(entries):
        try:
            keys.append(_key(entry))
        except (ValueError, InvalidCaller) as exc:
            raise ValueError(f"keys[{n}]: {exc}") from None
    kids = [key.kid for key in keys]
    if len(set(kids)) != len(kids):
        raise ValueError("a kid appears twice")
    return tuple(keys)


def _key(entry: object) -> AuthKey:
    if not isinstance(entry, dict):
        raise ValueError("must be an object")
    kid, alg = entry.get("kid"), entry.get("alg")
    if not isinstance(kid, str) or not 0 < len(kid) <= 128:
        raise ValueError("'kid' must be a string of 1-128 characters")
    tenant = validate_tenant(entry.get("tenant"))
    if alg not in ALGORITHMS:
        raise ValueError(f"'alg' must be one of {', '.join(ALGORITHMS)}")
    if alg == "HS256":
        return AuthKey(kid, tenant, alg, _secret(entry.get("secret")))
    pem = entry.get("public_key")
    if not isinstance(pem, str):
        raise ValueError(f"{alg} needs 'public_key' (PEM)")
    try:
        public = load_pem_public_key(pem.encode())
    except ValueError:
        raise ValueError("'public_key' is not a PEM public key") from None
    want: Sequence[type] = (rsa.RSAPublicKey,) if alg == "RS256" else (ec.EllipticCurvePublicKey,)
    if not isinstance(public, tuple(want)):
        raise ValueError(f"'public_key' is not a key for {alg}")
    if isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name != "secp256r1":
        raise ValueError("ES256 needs a P-256 key")
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        raise ValueError("RS256 needs a key of 2048 bits or more")
    return AuthKey(kid, tenant, alg, public)


def _secret(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("HS256 needs 'secret' (base64)")
    try:
        secret = base64.b64decode(value, validate=True)
    except binascii.Error:
        raise ValueError("'secret' is not base64") from None
    if len(secret) < _MIN_SECRET:
        raise ValueError(f"'secret' must be at least {_MIN_SECRET} bytes")
    return secret
