"""Sealing stored state under key IDs, and keyed caller digests."""

from __future__ import annotations

import base64
import os

import pytest

from gateway.core import sealing
from gateway.core.callerkey import CallerKey
from gateway.core.sealing import (
    Keyring,
    Unsealable,
    aad,
    new_key,
    parse_key,
    parse_state_keys,
)

OLD = ("k1", bytes(32))
NEW = ("k2", bytes(range(32)))
HASH_KEY = bytes(range(100, 132))
SCOPE = aad("hangon:acme:{abc}:session", "state")


def test_seal_opens_and_hides_the_plaintext() -> None:
    """A sealed blob opens to its plaintext, names its key, and never contains the plaintext."""
    ring = Keyring((NEW, OLD), HASH_KEY)
    data = b'{"form_answers":{"name":"Ada Lovelace","phone":"+14155550100"}}'
    blob = ring.seal(data, SCOPE)
    assert b"Ada" not in blob and b"4155550100" not in blob
    assert blob[:4] == b"\x01\x02k2"
    assert ring.open(blob, SCOPE) == data
    assert ring.seal(data, SCOPE) != blob  # a fresh nonce each time


def test_rotation_opens_old_blobs_and_seals_with_the_newest() -> None:
    """After rotation, blobs under the old key still open and new ones use the new key."""
    before = Keyring((OLD,), HASH_KEY)
    after = Keyring((NEW, OLD), HASH_KEY)
    old_blob = before.seal(b"x", SCOPE)
    assert after.open(old_blob, SCOPE) == b"x"
    assert after.seal(b"x", SCOPE)[2:4] == b"k2"
    assert after.key_ids == ["k2", "k1"]
    with pytest.raises(Unsealable, match="'k2', which is not listed"):
        before.open(after.seal(b"x", SCOPE), SCOPE)


@pytest.mark.parametrize(
    "mangle",
    [
        lambda b: b[:-1] + bytes([b[-1] ^ 1]),  # the tag
        lambda b: b[:10] + bytes([b[10] ^ 1]) + b[11:],  # the nonce
        lambda b: b"\x02" + b[1:],  # the version
        lambda b: b"",
        lambda b: b"\x01",
    ],
)
def test_tampered_blobs_do_not_open(mangle: object) -> None:
    """Any change to a sealed blob makes it unopenable rather than wrong."""
    ring = Keyring((NEW,), HASH_KEY)
    blob = ring.seal(b"state", SCOPE)
    with pytest.raises(Unsealable):
        ring.open(mangle(blob), SCOPE)  # type: ignore[operator]


def test_a_blob_is_bound_to_its_session_and_field() -> None:
    """A blob copied to another session, or from state to a message, does not open."""
    ring = Keyring((NEW,), HASH_KEY)
    blob = ring.seal(b"state", SCOPE)
    with pytest.raises(Unsealable, match="another session"):
        ring.open(blob, aad("hangon:acme:{other}:session", "state"))
    with pytest.raises(Unsealable):
        ring.open(blob, aad("hangon:acme:{abc}:session", "msg:1"))


def test_generated_keyrings_are_random_and_ephemeral() -> None:
    """Generated keyrings say they are ephemeral and cannot open each other's blobs."""
    a, b = Keyring.generate(), Keyring.generate()
    assert a.ephemeral and a != b
    with pytest.raises(Unsealable):
        b.open(a.seal(b"x", SCOPE), SCOPE)
    assert "hash_key" not in repr(a) or "bytes" not in repr(a)


def test_keyring_checks_its_keys() -> None:
    """A keyring needs a state key of 32 bytes and a caller hash key of 32-64 bytes."""
    with pytest.raises(ValueError, match="at least one"):
        Keyring((), HASH_KEY)
    with pytest.raises(ValueError, match="not 32 bytes"):
        Keyring((("k", bytes(16)),), HASH_KEY)
    with pytest.raises(ValueError, match="32-64 bytes"):
        Keyring((NEW,), bytes(31))
    with pytest.raises(ValueError, match="32-64 bytes"):
        Keyring((NEW,), bytes(65))


def test_parse_state_keys() -> None:
    """ID:BASE64 pairs parse newest first; malformed, short or repeated keys are refused."""
    one, two = new_key(), new_key()
    keys = parse_state_keys(f" k2:{two} , k1:{one},")
    assert keys == (("k2", base64.b64decode(two)), ("k1", base64.b64decode(one)))
    for bad, problem in [
        ("", "at least one"),
        (one, "ID:BASE64"),
        (f"bad id:{one}", "ID:BASE64"),
        (f"k1:{one},k1:{two}", "twice"),
        ("k1:not base64!", "not base64"),
        ("k1:" + base64.b64encode(bytes(16)).decode(), "32 bytes"),
    ]:
        with pytest.raises(ValueError, match=problem):
            parse_state_keys(bad)


def test_parse_key_minimum() -> None:
    """A key that need not be exact must still reach the minimum length."""
    assert parse_key(base64.b64encode(bytes(40)).decode(), exact=False) == bytes(40)
    with pytest.raises(ValueError, match="at least 32"):
        parse_key(base64.b64encode(bytes(20)).decode(), exact=False)


def test_from_text() -> None:
    """A keyring built from the configuration's text seals and opens."""
    ring = Keyring.from_text(f"a:{new_key()}", new_key())
    assert not ring.ephemeral and ring.key_ids == ["a"]
    assert ring.open(ring.seal(b"x", SCOPE), SCOPE) == b"x"


def test_digest_separates_every_part_and_depends_on_the_key() -> None:
    """Tenant, kind, subject, call ID and the hash key all change the digest; it hides the
    number."""
    ring = Keyring((NEW,), HASH_KEY)
    base = CallerKey("t", "phone", "+14155550100", "c")
    others = [
        CallerKey("u", "phone", "+14155550100", "c"),
        CallerKey("t", "user", "+14155550100", "c"),
        CallerKey("t", "phone", "+14155550101", "c"),
        CallerKey("t", "phone", "+14155550100", "d"),
    ]
    digests = {ring.digest(base), *(ring.digest(o) for o in others)}
    assert len(digests) == 5
    assert len(ring.digest(base)) == 26
    assert "4155550100" not in ring.digest(base)
    assert ring.digest(base) == Keyring((OLD,), HASH_KEY).digest(base)  # state keys don't matter
    assert ring.digest(base) != Keyring((NEW,), bytes(32)).digest(base)


def test_nonces_are_never_reused_across_batches() -> None:
    """Every seal gets its own nonce, past the end of each batch drawn at once."""
    ring = Keyring.generate()
    nonces = {ring.seal(b"x", SCOPE)[11:23] for _ in range(3 * sealing._NONCES_AT_ONCE + 5)}
    assert len(nonces) == 3 * sealing._NONCES_AT_ONCE + 5


def test_forked_child_does_not_reuse_the_parents_nonces() -> None:
    """A child must not seal with the nonces its parent seals with next (nonce reuse
    under one key breaks AES-GCM)."""
    sealing._nonce()  # a batch is in memory when the fork happens
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(write, b"".join(sealing._nonce() for _ in range(4)))
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64)
    os.close(read)
    assert len(child) == 48
    parent = b"".join(sealing._nonce() for _ in range(4))
    assert child != parent
    assert not {child[i : i + 12] for i in range(0, 48, 12)} & {
        parent[i : i + 12] for i in range(0, 48, 12)
    }


def test_drop_nonces() -> None:
    """What the child runs at the fork (the test above shows that it runs)."""
    sealing._nonce()
    sealing._drop_nonces()
    assert next(sealing._nonces, None) is None
    assert len(sealing._nonce()) == 12
