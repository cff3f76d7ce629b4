"""What the store keeps of a caller is unreadable without the gateway's keys.

Two secrets, kept apart because they age differently:

- **State keys** seal every snapshot body and every replay message with
  AES-256-GCM (``cryptography``). Each key has an ID, written in front of what
  it sealed: new writes use the first (newest) key, and a blob sealed under an
  older key still opens while that key is listed. Rotation: list the new key
  second on every instance, then first, then drop the old one once the
  session TTL has passed.
- **The caller hash key** turns a caller key (tenant, phone number or user ID,
  call ID) into the digest that storage keys and logs carry: keyed BLAKE2b, so
  that nobody without the key can test a guessed phone number against a key.
  It never rotates: a new one orphans every stored session.

A sealed blob is ``b"\\x01"``, one byte of key ID length, the key ID, a 96-bit
random nonce and the ciphertext with its tag. The associated data names the
session and the field (``aad``), so a blob copied into another session's
record, or from ``state`` into ``msgs``, fails to open.

Nonces are drawn from ``os.urandom`` a batch at a time (:func:`_nonce`): each is still
96 bits from the operating system's generator, used once, but a turn no longer pays a
``getrandom`` system call for 12 bytes (4 % of a turn's CPU in py-spy). A nonce is
not secret (it is written beside the ciphertext), so a batch in memory gives nothing
away; a forked child drops its parent's batch, or both would seal with the same nonces.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from gateway.core.callerkey import CallerKey
from gateway.exceptions import GatewayError

__all__ = ["Keyring", "Unsealable", "aad", "new_key", "parse_key", "parse_state_keys"]

_VERSION = b"\x01"
_NONCE = 12
_KEY_BYTES = 32
_MIN_HASH_KEY = 32
_MAX_HASH_KEY = 64
"""BLAKE2b's longest key."""
_KID_RE = re.compile(r"[A-Za-z0-9_.-]{1,32}")
_NONCES_AT_ONCE = 256
_NONCE_FORMAT = struct.Struct(f"{_NONCE}s")
_nonces: Iterator[tuple[bytes]] = iter(())


def _nonce() -> bytes:
    """A nonce no other seal gets: the next of a batch from ``os.urandom``. Taking one
    is a single ``next`` on an iterator, atomic under the GIL: two threads never get
    the same one (at worst both draw a batch)."""
    global _nonces
    for (nonce,) in _nonces:
        return nonce
    _nonces = _NONCE_FORMAT.iter_unpack(os.urandom(_NONCE * _NONCES_AT_ONCE))
    return _nonce()


def _drop_nonces() -> None:
    """In a forked child: a batch of its own, never the rest of its parent's."""
    global _nonces
    _nonces = iter(())


os.register_at_fork(after_in_child=_drop_nonces)


class Unsealable(GatewayError, ValueError):
    """A sealed blob does not open: unknown key ID, wrong session, or tampered with."""


def aad(scope: str, what: str) -> bytes:
    """The associated data binding a blob to one session (``scope``) and one field."""
    return f"{scope}|{what}".encode()


def new_key() -> str:
    """A fresh random 256-bit key, base64 encoded (what ``hangon keygen`` prints)."""
    return base64.b64encode(os.urandom(_KEY_BYTES)).decode()


def parse_key(text: str, *, minimum: int = _KEY_BYTES, exact: bool = True) -> bytes:
    """Decode a base64 key and check its length.

    Raises:
        ValueError: If it is not base64 or has the wrong length.
    """
    try:
        key = base64.b64decode(text.strip(), validate=True)
    except binascii.Error:
        raise ValueError("not base64") from None
    if exact and len(key) != minimum:
        raise ValueError(f"must be {minimum} bytes (base64 of {minimum} random bytes)")
    if len(key) < minimum:
        raise ValueError(f"must be at least {minimum} bytes")
    return key


def parse_state_keys(text: str) -> tuple[tuple[str, bytes], ...]:
    """Parse ``id:base64key,id:base64key``, newest first.

    Raises:
        ValueError: If an entry is malformed, a key is not 32 bytes, or an ID repeats.
    """
    keys: list[tuple[str, bytes]] = []
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        kid, sep, encoded = entry.partition(":")
        if not sep or not _KID_RE.fullmatch(kid):
            raise ValueError("each key is ID:BASE64, the ID 1-32 characters of A-Z a-z 0-9 _ . -")
        if any(kid == seen for seen, _ in keys):
            raise ValueError(f"key ID {kid!r} appears twice")
        keys.append((kid, parse_key(encoded)))
    if not keys:
        raise ValueError("needs at least one ID:BASE64 key")
    return tuple(keys)


@dataclass(frozen=True, slots=True)
class Keyring:
    """The state keys (newest first) and the caller hash key.

    Args:
        keys: ``(key ID, 32-byte key)`` pairs; the first seals new writes.
        hash_key: At least 32 bytes; the key of caller-key digests.
        ephemeral: Made up at start-up (the embedded store): nothing it sealed
            survives the process, which is all the embedded store keeps anyway.
    """

    keys: tuple[tuple[str, bytes], ...]
    hash_key: bytes = field(repr=False)
    """32-64 bytes."""
    ephemeral: bool = False
    _ciphers: dict[bytes, AESGCM] = field(default_factory=dict, compare=False, repr=False)
    _newest: bytes = field(default=b"", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a keyring needs at least one state key")
        if not _MIN_HASH_KEY <= len(self.hash_key) <= _MAX_HASH_KEY:
            raise ValueError(f"the caller hash key must be {_MIN_HASH_KEY}-{_MAX_HASH_KEY} bytes")
        for kid, key in self.keys:
            if len(key) != _KEY_BYTES:
                raise ValueError(f"state key {kid!r} is not {_KEY_BYTES} bytes")
            self._ciphers[kid.encode()] = AESGCM(key)
        newest = self.keys[0][0].encode()
        object.__setattr__(self, "_newest", _VERSION + bytes([len(newest)]) + newest)

    @classmethod
    def generate(cls) -> Keyring:
        """A keyring of fresh random keys, for a store that lives no longer than its process."""
        return cls((("ephemeral", os.urandom(_KEY_BYTES)),), os.urandom(_KEY_BYTES), ephemeral=True)

    @classmethod
    def from_text(cls, state_keys: str, hash_key: str) -> Keyring:
        """Build a keyring from the configuration's text forms.

        Raises:
            ValueError: If either is malformed.
        """
        return cls(parse_state_keys(state_keys), parse_key(hash_key, exact=False))

    @property
    def key_ids(self) -> Sequence[str]:
        """The state key IDs, newest first."""
        return [kid for kid, _ in self.keys]

    def seal(self, data: bytes, aad: bytes) -> bytes:
        """Encrypt ``data`` under the newest key, bound to ``aad``."""
        header = self._newest
        nonce = _nonce()
        return header + nonce + self._ciphers[header[2:]].encrypt(nonce, data, header + aad)

    def open(self, blob: bytes, aad: bytes) -> bytes:
        """Decrypt what :meth:`seal` made, under whichever listed key sealed it.

        Raises:
            Unsealable: If the blob is malformed, its key is not listed, or it was
                sealed for another ``aad`` or changed since.
        """
        if len(blob) < 2 or blob[:1] != _VERSION:
            raise Unsealable("not a sealed blob")
        end = 2 + blob[1]
        cipher = self._ciphers.get(blob[2:end])
        if cipher is None:
            kid = blob[2:end].decode(errors="replace")
            raise Unsealable(f"sealed under key {kid!r}, which is not listed")
        try:
            return cipher.decrypt(blob[end : end + _NONCE], blob[end + _NONCE :], blob[:end] + aad)
        except InvalidTag:
            raise Unsealable("does not open: another session's, or changed") from None

    def digest(self, caller: CallerKey) -> str:
        """A 26-character base32 keyed digest of ``caller``, safe for keys and logs."""
        raw = "\x00".join((caller.tenant, caller.kind, caller.subject, caller.call_id)).encode()
        mac = hashlib.blake2b(raw, digest_size=16, key=self.hash_key, person=b"hangon-caller")
        return base64.b32encode(mac.digest()).decode().rstrip("=").lower()
