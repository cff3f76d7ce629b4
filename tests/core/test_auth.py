"""Signed client tokens: keys, verification, and what a grant allows."""

from __future__ import annotations

import base64
import time

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from gateway.core import codec
from gateway.core.auth import AuthError, Verifier, parse_auth_keys
from gateway.core.callerkey import CallerKey
from tests.support.authkeys import ACME_SECRET, keys_document, private_keys, token

ADA = {"phone": "+14155550100", "call_id": "CA1"}


@pytest.fixture(scope="module")
def verifier() -> Verifier:
    return Verifier(parse_auth_keys(keys_document()), leeway=0, default_region="US")


@pytest.mark.parametrize("tenant", ["acme", "initech", "umbrella"])
def test_each_algorithm_verifies(verifier: Verifier, tenant: str) -> None:
    """HS256, RS256 and ES256 tokens verify and grant their caller key."""
    grant = verifier.verify(token(ADA, tenant=tenant))
    assert grant.bound
    assert grant.caller == CallerKey(tenant, "phone", "+14155550100", "CA1")
    assert grant.expires > time.time()


def test_grant_binds_tenant_and_caller(verifier: Verifier) -> None:
    """A call-bound grant allows its caller key only; a subject grant any call of its number."""
    bound = verifier.verify(token({"phone": "(415) 555-0100", "call_id": "CA1"}))
    ada = CallerKey("acme", "phone", "+14155550100", "CA1")
    assert bound.allows(ada)
    assert not bound.allows(CallerKey("acme", "phone", "+14155550100", "CA2"))
    assert not bound.allows(CallerKey("globex", "phone", "+14155550100", "CA1"))
    assert not bound.allows(CallerKey("acme", "phone", "+14155550101", "CA1"))
    assert not bound.allows(CallerKey("acme", "user", "+14155550100", "CA1"))
    subject = verifier.verify(token({"phone": "+14155550100"}))
    assert not subject.bound
    assert subject.allows(ada) and subject.allows(CallerKey("acme", "phone", "+14155550100", "X"))
    assert not subject.allows(CallerKey("acme", "phone", "+14155550101", "X"))


def reason(verifier: Verifier, raw: str) -> str:
    with pytest.raises(AuthError) as caught:
        verifier.verify(raw)
    assert caught.value.code in str(caught.value)
    return caught.value.code


def test_refusals_say_why(verifier: Verifier) -> None:
    """Every way a token can be wrong is refused with its own reason."""
    good = token(ADA)
    assert reason(verifier, "") == "malformed_token"
    assert reason(verifier, "x" * 9000) == "malformed_token"
    assert reason(verifier, "not.a.jwt") == "malformed_token"
    unsigned_kid = jwt.encode({"caller": ADA, "exp": time.time() + 60}, ACME_SECRET, "HS256")
    assert reason(verifier, unsigned_kid) == "unknown_key"
    assert reason(verifier, token(ADA, ttl=-60)) == "expired_token"
    head, body, _ = good.split(".")
    forged = jwt.encode(
        {"tenant": "acme", "caller": ADA, "exp": time.time() + 60},
        bytes(32),
        "HS256",
        headers={"kid": "acme-1"},
    )
    assert reason(verifier, forged) == "bad_signature"
    assert reason(verifier, f"{head}.{body}.") == "bad_signature"
    # Another algorithm than the key's: refused, whatever the signature.
    none_alg = jwt.encode({"caller": ADA, "exp": time.time() + 60}, None, "none", {"kid": "acme-1"})
    assert reason(verifier, none_alg) == "bad_signature"
    no_exp = jwt.encode({"tenant": "acme", "caller": ADA}, ACME_SECRET, "HS256", {"kid": "acme-1"})
    assert reason(verifier, no_exp) == "invalid_claims"
    assert reason(verifier, token(ADA, nbf=int(time.time()) + 600)) == "invalid_claims"
    no_caller = jwt.encode({"exp": time.time() + 60}, ACME_SECRET, "HS256", {"kid": "acme-1"})
    assert reason(verifier, no_caller) == "invalid_claims"
    assert reason(verifier, token({"phone": "nope", "call_id": "c"})) == "invalid_claims"


def test_a_key_signs_for_its_own_tenant_only(verifier: Verifier) -> None:
    """acme's key cannot mint a token for globex, whatever the token says."""
    assert reason(verifier, token(ADA, tenant="globex", kid="acme-1")) == "wrong_tenant"
    implicit = jwt.encode(
        {"caller": ADA, "exp": time.time() + 60}, ACME_SECRET, "HS256", {"kid": "acme-1"}
    )
    assert verifier.verify(implicit).caller.tenant == "acme"  # no claim: the key's tenant


def pem(key: object) -> str:
    return (
        key.public_key()
        .public_bytes(  # type: ignore[attr-defined,no-any-return]
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        .decode()
    )


def entry(**fields: object) -> str:
    base: dict[str, object] = {"kid": "k", "tenant": "acme", "alg": "HS256"}
    return codec.dumps({"keys": [{**base, **fields}]}).decode()


def test_keys_document_is_checked() -> None:
    """Malformed documents and weak or mismatched keys are refused, naming the entry."""
    secret = base64.b64encode(bytes(32)).decode()
    assert parse_auth_keys(entry(secret=secret))[0].key == bytes(32)
    rsa_small = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    p384 = ec.generate_private_key(ec.SECP384R1())
    cases = [
        ("{", "not JSON"),
        ("[]", "keys"),
        ('{"keys": []}', "at least one"),
        ('{"keys": [1]}', r"keys\[0\]: must be an object"),
        (entry(kid="", secret=secret), "'kid'"),
        (entry(tenant="bad tenant", secret=secret), "tenant"),
        (entry(alg="HS512", secret=secret), "'alg'"),
        (entry(), "needs 'secret'"),
        (entry(secret="***"), "not base64"),
        (entry(secret=base64.b64encode(bytes(16)).decode()), "at least 32"),
        (entry(alg="RS256"), "needs 'public_key'"),
        (entry(alg="RS256", public_key="nope"), "not a PEM"),
        (entry(alg="RS256", public_key=pem(private_keys()["umbrella-ec"])), "not a key for"),
        (entry(alg="ES256", public_key=pem(private_keys()["initech-rsa"])), "not a key for"),
        (entry(alg="ES256", public_key=pem(p384)), "P-256"),
        (entry(alg="RS256", public_key=pem(rsa_small)), "2048"),
        (entry(alg="ES256", public_key=pem(ed25519.Ed25519PrivateKey.generate())), "not a key"),
    ]
    for text, problem in cases:
        with pytest.raises(ValueError, match=problem):
            parse_auth_keys(text)
    twice = codec.dumps(
        {"keys": [{"kid": "k", "tenant": "a", "alg": "HS256", "secret": secret}] * 2}
    ).decode()
    with pytest.raises(ValueError, match="twice"):
        parse_auth_keys(twice)


def test_a_verified_token_is_remembered_until_it_expires() -> None:
    """A token presented again is not verified again, but its expiry still counts; the
    cache holds a bounded number of tokens."""
    now = [time.time()]
    verifier = Verifier(parse_auth_keys(keys_document()), leeway=0, cache=2, clock=lambda: now[0])
    first, second, third = (token({**ADA, "call_id": f"c{n}"}, ttl=60) for n in range(3))
    grant = verifier.verify(first)
    assert verifier.verify(first) is grant  # from the cache
    verifier.verify(second)
    verifier.verify(third)  # first is pushed out
    assert verifier.verify(first) is not grant
    now[0] += 120
    with pytest.raises(AuthError) as caught:
        verifier.verify(first)
    assert caught.value.code == "expired_token"
    assert first not in verifier._cache  # an expired token is forgotten
