"""The store fixture: a store of the test's kind (see tests/conftest.py), closed after."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.store.base import SessionStore, StoreSettings
from tests.support.stores import StoreFactory


@pytest.fixture
async def store(make_store: StoreFactory, settings: StoreSettings) -> AsyncIterator[SessionStore]:
    """A store of the test's kind with the test's settings; closed after the test."""
    s = make_store(settings)
    yield s
    await s.aclose()
