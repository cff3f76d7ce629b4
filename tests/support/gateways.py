"""In-process gateways for tests: what the ``make_gateway`` fixture builds."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Any

from gateway.config import Config
from gateway.metrics import Metrics
from gateway.server import Gateway
from gateway.store.base import SessionStore, StoreSettings
from tests.support.agents import Reply, TestAgent, silent
from tests.support.stores import StoreFactory

__all__ = ["GatewayFactory", "RelayFactory", "quick_retries"]


def quick_retries() -> Iterable[float]:
    """Store retry delays that keep a test short: three, of 10 to 50 ms."""
    return [0.01, 0.02, 0.05]


@dataclass(frozen=True, slots=True)
class GatewayFactory:
    """Builds gateways on 127.0.0.1, each on a free port, with the suite's defaults.

    ``async with make_gateway(config, store=..., clock=...) as gw`` starts one and closes it
    at the end of the block, so that a test may read its metrics afterwards and nest it
    inside whatever must outlive it (an agent, a Redis).
    """

    config: Config
    """What a gateway gets unless the call names another config."""

    @contextlib.asynccontextmanager
    async def __call__(
        self,
        config: Config | None = None,
        *,
        store: SessionStore | None = None,
        metrics: Metrics | None = None,
        delays: Callable[[], Iterable[float]] | None = None,
        clock: Callable[[], int] | None = None,
    ) -> AsyncIterator[Gateway]:
        """Start a gateway and yield it; close it on the way out.

        Args:
            config: Its settings; the factory's by default.
            store: A store (or a wrapper around one) to use instead of the one ``config``
                names (memory, unless ``store.redis_url`` is set).
            metrics: Its metrics; fresh ones (``Metrics()``) by default.
            delays: Store retry delays; the backoff ``config`` sets by default.
            clock: Milliseconds since the epoch; the real clock by default.
        """
        options: dict[str, Any] = {}
        if delays is not None:
            options["delays"] = delays
        if clock is not None:
            options["clock"] = clock
        async with Gateway(
            config if config is not None else self.config,
            store=store,
            metrics=metrics if metrics is not None else Metrics(),
            **options,
        ) as gw:
            yield gw


@dataclass(frozen=True, slots=True)
class RelayFactory:
    """Builds a :class:`TestAgent` and a gateway whose sessions it serves (the ``relay``
    fixture of ``tests/transport``).

    ``async with relay(reply) as (gw, voice)``: the agent answers with ``reply``; the gateway
    has the test's store kind and clock, and quick store retries.
    """

    make_gateway: GatewayFactory
    config: Config
    """The test's config; the agent's address is set in it."""
    settings: StoreSettings
    """The test's store settings."""
    make_store: StoreFactory
    """Builds a store of the test's kind."""
    clock: Callable[[], int]

    @contextlib.asynccontextmanager
    async def __call__(
        self,
        reply: Reply = silent,
        *,
        config: Config | None = None,
        settings: StoreSettings | None = None,
        store: SessionStore | None = None,
    ) -> AsyncIterator[tuple[Gateway, TestAgent]]:
        """Start the agent and the gateway and yield both; close them on the way out.

        Args:
            reply: How the agent answers each frame.
            config: Instead of the test's config.
            settings: Instead of the test's store settings.
            store: Instead of a new store of the test's kind (a wrapper around one, say).
        """
        async with TestAgent(reply) as voice:
            cfg = config if config is not None else self.config
            cfg = cfg.replace("agent", downstream=voice.url)
            async with self.gateway(cfg, settings=settings, store=store) as gw:
                yield gw, voice

    def gateway(
        self,
        config: Config | None = None,
        *,
        settings: StoreSettings | None = None,
        store: SessionStore | None = None,
    ) -> AbstractAsyncContextManager[Gateway]:
        """The same gateway without a test agent: ``config`` names the agent (one the test
        starts later, or none)."""
        settings = settings if settings is not None else self.settings
        cfg = config if config is not None else self.config
        return self.make_gateway(
            cfg.replace("store", replay_window=settings.replay_window),
            store=self.make_store(settings) if store is None else store,
            clock=self.clock,
            delays=quick_retries,
        )
