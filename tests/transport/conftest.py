"""The relay fixture: a gateway and the test agent it relays to, on the test's store kind;
and ``no_collector``, for tests that check what reference counting alone frees."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.config import Config
from gateway.store.base import StoreSettings
from tests.support.clock import Clock
from tests.support.gateways import GatewayFactory, RelayFactory
from tests.support.stores import StoreFactory


@pytest.fixture
def relay(
    make_gateway: GatewayFactory,
    config: Config,
    settings: StoreSettings,
    make_store: StoreFactory,
    clock: Clock,
) -> RelayFactory:
    """``async with relay(reply, *, config=, settings=, store=) as (gw, voice)``: a test
    agent answering with ``reply`` and a gateway relaying to it, on the test's store kind."""
    return RelayFactory(make_gateway, config, settings, make_store, clock)


@pytest.fixture
def no_collector() -> Iterator[None]:
    """The cyclic garbage collector off for the test (after one collection): what is left
    then waits for a collection the gateway runs rarely (gateway.cli.tune_gc)."""
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()
