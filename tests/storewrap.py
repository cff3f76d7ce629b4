"""Wrappers around a real store that change one behaviour, for race and fault tests."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.store.base import Takeover

__all__ = ["Deaf"]


class Deaf:
    """Delegates to a real store but never hears takeover notices, as when Redis pub/sub
    lost them: only the epoch check (and the next renewal) fences this instance."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def listen(self, owner: str, on_takeover: Takeover) -> None:
        await asyncio.Event().wait()
