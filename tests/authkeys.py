"""Moved to :mod:`tests.support.authkeys`; kept only for ``tests/core/test_auth.py``.

Delete this file once that test imports ``tests.support.authkeys``: ``tests/core/`` is
edited elsewhere, and a one-line change there is not this move's to make.
"""

from tests.support.authkeys import ACME_SECRET, keys_document, private_keys, token

__all__ = ["ACME_SECRET", "keys_document", "private_keys", "token"]
