"""Shared fixtures: private Redis processes, stores of each kind, and in-process gateways.

Store kinds
    A test that takes ``store_kind``, directly or through ``make_store``, ``store_config``,
    ``gateway`` or ``store`` (tests/store), runs once per kind of store: ``memory``,
    ``redis`` (the run's private redis-server) and ``cluster`` (its private three-primary
    Redis Cluster). The ``stores`` marker narrows that, on a test, a class or a module
    (tests that take no store ignore it)::

        pytestmark = pytest.mark.stores("redis")

        @pytest.mark.stores("memory", "redis")
        async def test_turns(make_store: StoreFactory, settings: StoreSettings) -> None: ...

    ``make_store(settings)`` then builds a store of the kind; wrap it to change one of its
    behaviours (``tests/support/storewrap.py``). ``store_config`` is ``config`` naming the
    store instead, for gateways that open their own: two instances sharing one Redis.
    Tests of Redis itself (killed, replicated, its round trips counted) start their own
    processes (``own_redis``, ``own_redis_cluster``, ``tests/support/redis_server.py``);
    ``tests/store/test_stores_alike.py`` builds a memory and a Redis store side by side.

Gateways
    ``async with make_gateway(cfg, store=..., metrics=..., delays=..., clock=...) as gw``
    starts an in-process gateway on 127.0.0.1, port 0, and closes it when the block ends.
    Every argument may be left out: ``config`` (this test's), fresh ``Metrics()``, the store
    the config names, the config's retry backoff and the real clock. ``gateway`` is one
    such gateway on the test's store kind and settable ``clock``, with quick retries;
    ``relay`` (tests/transport) adds a test agent it relays to.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis

from gateway.config import Config
from gateway.server import Gateway
from gateway.store.base import StoreSettings
from loadtest import twilio as loadtest_twilio
from tests.support.clock import Clock
from tests.support.gateway_process import GatewayProcess
from tests.support.gateways import GatewayFactory, quick_retries
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer, ensure_redis_server
from tests.support.stores import (
    STORE_KINDS,
    TEST_CALLER_HASH_KEY,
    TEST_KEYRING,
    TEST_STATE_KEYS,
    StoreFactory,
    new_store,
)
from tests.support.tools import ensure

os.environ.setdefault("HANGON_STATE_KEYS", TEST_STATE_KEYS)
os.environ.setdefault("HANGON_CALLER_HASH_KEY", TEST_CALLER_HASH_KEY)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "stores(*kinds): run against these store kinds only (memory, redis, cluster); "
        "without it a test that takes store_kind runs against all three",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Run each test that takes ``store_kind`` once per kind its ``stores`` marker names."""
    if "store_kind" not in metafunc.fixturenames:
        return
    marker = metafunc.definition.get_closest_marker("stores")
    kinds = marker.args if marker is not None else STORE_KINDS
    unknown = [kind for kind in kinds if kind not in STORE_KINDS]
    if unknown or not kinds:
        raise pytest.UsageError(
            f"{metafunc.definition.nodeid}: stores{kinds!r}: not in {STORE_KINDS}"
        )
    metafunc.parametrize("store_kind", kinds, indirect=True)


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(autouse=True)
def no_unhandled_loop_errors() -> Iterator[None]:
    """Fail the test if an event loop reported an exception nobody handled: "Task exception
    was never retrieved", an exception in a callback. Set up before the test's loop, so it
    checks after that loop is closed and its dead tasks collected."""
    handler = _Records()
    logger = logging.getLogger("asyncio")
    logger.addHandler(handler)
    try:
        yield
        gc.collect()
    finally:
        logger.removeHandler(handler)
    if handler.records:
        pytest.fail(
            "unhandled exception in the event loop:\n"
            + "\n".join(handler.format(record) for record in handler.records),
            pytrace=False,
        )


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=None,
        help="use this Redis instead of starting private redis-server processes "
        "(tests that kill Redis are skipped)",
    )


@pytest.fixture(scope="session")
def redis_binary(pytestconfig: pytest.Config) -> str:
    path = ensure_redis_server()
    if path is None:
        pytest.exit(
            "redis-server not found: install it (apt-get install redis-server) or pass --redis-url",
            returncode=3,
        )
    return path


@pytest.fixture(scope="session")
def redis_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    external = request.config.getoption("--redis-url")
    if external:
        yield external
        return
    request.getfixturevalue("redis_binary")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


@pytest.fixture
def own_redis(
    pytestconfig: pytest.Config, redis_binary: str, tmp_path: Path
) -> Iterator[RedisServer]:
    """A durable redis-server for this test alone, which the test may kill and restart."""
    if pytestconfig.getoption("--redis-url"):
        pytest.skip("kills Redis; runs only with private redis-server processes")
    server = RedisServer(tmp_path / "redis", durable=True)
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="session")
def redis_cluster_binaries() -> None:
    """Skip unless redis-server (installed with apt when root) and redis-cli are there."""
    if ensure_redis_server() is None:
        pytest.skip("redis-server not found: apt-get install redis-server")
    if shutil.which("redis-cli") is None:
        pytest.skip("redis-cli not found: apt-get install redis-tools")


@pytest.fixture(scope="session")
def redis_cluster(
    redis_cluster_binaries: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisCluster]:
    """A three-primary Redis Cluster shared by the whole run; do not kill its nodes."""
    with RedisCluster(tmp_path_factory.mktemp("redis-cluster")) as cluster:
        yield cluster


@pytest.fixture
def own_redis_cluster(redis_cluster_binaries: None, tmp_path: Path) -> Iterator[RedisCluster]:
    """A three-primary Redis Cluster for this test alone, whose nodes it may kill and restart."""
    with RedisCluster(tmp_path / "redis-cluster") as cluster:
        yield cluster


@pytest.fixture
def demo_agent(tmp_path: Path) -> Iterator[GatewayProcess]:
    """``hangon demo-agent`` in a process of its own, which the test may kill."""
    agent = GatewayProcess(tmp_path / "agent.log", command="demo-agent")
    agent.start()
    yield agent
    if agent.proc is not None and agent.proc.poll() is None:
        agent.kill()


@pytest.fixture(scope="session")
def speech(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """Real speech as Twilio sends it: espeak-ng's voice, converted to 8 kHz μ-law by sox."""
    missing = [tool for tool in ("espeak-ng", "sox") if ensure(tool, tool) is None]
    if missing:
        pytest.skip(f"{' and '.join(missing)} not found: apt-get install espeak-ng sox")
    audio = loadtest_twilio.speech(
        "My name is Ada Lovelace, and I would like a checkup on Friday.",
        tmp_path_factory.mktemp("speech"),
    )
    assert len(audio) > 8000 * 2  # over two seconds of it
    return audio


@pytest.fixture
def key_prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards (never FLUSHDB)."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    try:
        keys = list(client.scan_iter(match=prefix + "*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store_kind(request: pytest.FixtureRequest) -> str:
    """The kind of store this run of the test uses (see the module docstring)."""
    kind: str = request.param
    return kind


def _store_url(kind: str, request: pytest.FixtureRequest) -> str | None:
    """Where a store of ``kind`` lives: nowhere for memory, else the run's Redis or cluster."""
    if kind == "memory":
        return None
    if kind == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.url
    url: str = request.getfixturevalue("redis_url")
    return url


@pytest.fixture
def make_store(store_kind: str, request: pytest.FixtureRequest) -> StoreFactory:
    """Build a store of the test's kind with the given settings."""
    url = _store_url(store_kind, request)
    return lambda settings: new_store(url, settings)


@pytest.fixture
def settings(key_prefix: str) -> StoreSettings:
    return StoreSettings(
        key_prefix=key_prefix, ttl=60.0, end_ttl=30.0, max_age=20.0, keyring=TEST_KEYRING
    )


@pytest.fixture
def config(settings: StoreSettings) -> Config:
    # No agent: these tests read the client's frames one by one. Tests of the relay
    # start an agent of their own (tests/support/agents.py).
    base = (
        Config()
        .replace("server", port=0)
        .replace("agent", downstream="off")
        .replace(
            "security",
            state_keys=TEST_KEYRING.keys,
            caller_hash_key=TEST_KEYRING.hash_key,
        )
    )
    return base.replace(
        "store",
        key_prefix=settings.key_prefix,
        ttl=settings.ttl,
        end_ttl=settings.end_ttl,
        max_age=settings.max_age,
    )


@pytest.fixture
def store_config(config: Config, store_kind: str, request: pytest.FixtureRequest) -> Config:
    """``config`` naming a store of the test's kind, for gateways that open their own."""
    url = _store_url(store_kind, request)
    return config if url is None else config.replace("store", redis_url=url)


@pytest.fixture
def make_gateway(config: Config) -> GatewayFactory:
    """``async with make_gateway(cfg, *, store, metrics, delays, clock) as gw``: a gateway
    with the suite's defaults (see the module docstring)."""
    return GatewayFactory(config)


@pytest.fixture
async def gateway(
    make_gateway: GatewayFactory, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> AsyncIterator[Gateway]:
    """A gateway on 127.0.0.1, a free port, with the test's store kind and a settable clock."""
    async with make_gateway(store=make_store(settings), clock=clock, delays=quick_retries) as gw:
        yield gw
