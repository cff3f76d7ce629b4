"""Random bytes from the operating system, fetched 4 KiB at a time.

Every seal takes a 96-bit nonce, and every restore a session ID and a resume token. One
``os.urandom`` call each was a system call per use: on this project's machines, a seal's
nonce cost nearly three times its encryption, 4 % of a turn's CPU. The bytes are the
same (the kernel's CSPRNG), each handed out once, so they serve the same purposes.

Two rules keep that true. A forked child drops what its parent fetched, or both would hand
out the same nonces under the same key (``os.register_at_fork``). A lock makes each take
atomic, for callers on other threads.

:func:`unique_id` is for what needs only to be unique, not unpredictable (write and push
IDs): a random prefix per process and a counter, with no randomness per call.
"""

from __future__ import annotations

import base64
import itertools
import os
import threading

__all__ = ["random_bytes", "random_token", "unique_id"]

_FETCH = 4096
"""Bytes read from the OS at a time."""

_lock = threading.Lock()
_pool = b""
_at = 0


def random_bytes(n: int) -> bytes:
    """``n`` bytes (at most 4096) from the OS's CSPRNG that nobody else was given."""
    global _pool, _at
    with _lock:
        at = _at
        if at + n > len(_pool):
            _pool = os.urandom(max(_FETCH, n))
            at = 0
        _at = at + n
        return _pool[at : at + n]


def random_token(n: int) -> str:
    """``n`` random bytes as unpadded URL-safe base64, as ``secrets.token_urlsafe(n)``."""
    return base64.urlsafe_b64encode(random_bytes(n)).rstrip(b"=").decode("ascii")


_prefix = random_token(9)
_count = itertools.count()


def unique_id() -> str:
    """An ID that no other call, here or in another process, returns: a random prefix
    per process (72 bits) and a counter."""
    return f"{_prefix}{next(_count):x}"


def _forget() -> None:
    """In a forked child: nothing of the parent's is handed out again."""
    global _lock, _pool, _at, _prefix, _count
    _lock = threading.Lock()  # another thread may have held it at the fork
    _pool = b""
    _at = 0
    _prefix = random_token(9)
    _count = itertools.count()


os.register_at_fork(after_in_child=_forget)
