"""Wrappers around a real store that change one behaviour, for race and fault tests."""

from __future__ import annotations

import asyncio
from typing import Any

from gateway.exceptions import StoreUnavailable
from gateway.store.base import Takeover

__all__ = ["Deaf", "Gated", "Outage", "SlowFirstRestore", "Wrapper"]


class Wrapper:
    """Delegates every call to a real store, ``inner``; a subclass changes what it overrides.

    Args:
        inner: The store (or another wrapper) that does the work.
    """

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.name = inner.name

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


class Deaf(Wrapper):
    """Delegates to a real store but never hears takeover notices, as when Redis pub/sub
    lost them: only the epoch check (and the next renewal) fences this instance."""

    async def listen(self, owner: str, on_takeover: Takeover) -> None:
        await asyncio.Event().wait()


class Gated(Wrapper):
    """Delegates to a real store, but each restore waits until the test opens the gate,
    as when Redis is slow under a reconnect storm."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.gate = asyncio.Event()
        self.entered = 0
        """Restores that reached the store (and wait at the gate if it is shut)."""

    async def restore(self, *args: Any, **kwargs: Any) -> Any:
        self.entered += 1
        await self.gate.wait()
        return await self.inner.restore(*args, **kwargs)


class Outage(Wrapper):
    """Delegates to a real store, but while :attr:`down` every operation fails as
    unavailable, as Redis does when it is stopped."""

    _OPS = ("restore", "write_turn", "push", "end", "touch", "notify", "ping")

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.down = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self._OPS:
            return attr

        async def op(*args: Any, **kwargs: Any) -> Any:
            if self.down:
                raise StoreUnavailable(name, "connection refused")
            return await attr(*args, **kwargs)

        return op


class SlowFirstRestore(Wrapper):
    """Delegates to a real store; restore number ``slow`` (the first by default) answers
    only when released."""

    def __init__(self, inner: Any, *, slow: int = 1) -> None:
        super().__init__(inner)
        self.release = asyncio.Event()
        self.calls = 0
        self.slow = slow

    @property
    def first(self) -> bool:
        """Whether the slow restore has not started yet."""
        return self.calls < self.slow

    async def restore(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.slow:
            await self.release.wait()
        return await self.inner.restore(*args, **kwargs)
