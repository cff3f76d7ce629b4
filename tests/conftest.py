"""Shared fixtures: a private redis-server and Redis Cluster per test run, stores, and a
running gateway."""

from __future__ import annotations

import base64
import gc
import logging
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest
import redis

from gateway.config import Config
from gateway.core.sealing import Keyring
from gateway.metrics import Metrics
from gateway.server import Gateway
from gateway.store.base import SessionStore, StoreSettings
from gateway.store.memory_store import MemoryStore
from gateway.store.redis_store import RedisStore
from loadtest import twilio as loadtest_twilio
from tests.support.gateway_process import GatewayProcess
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer, ensure_redis_server
from tests.support.tools import ensure

TEST_STATE_KEYS = "t1:" + base64.b64encode(bytes(range(32))).decode()
TEST_CALLER_HASH_KEY = base64.b64encode(bytes(range(32, 64))).decode()
TEST_KEYRING = Keyring.from_text(TEST_STATE_KEYS, TEST_CALLER_HASH_KEY)
"""The keys of every gateway and store in the suite; gateway subprocesses get them from
the environment, as an operator's would."""
os.environ.setdefault("HANGON_STATE_KEYS", TEST_STATE_KEYS)
os.environ.setdefault("HANGON_CALLER_HASH_KEY", TEST_CALLER_HASH_KEY)


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


class Clock:
    """A settable clock in milliseconds, starting now."""

    def __init__(self) -> None:
        self.now = time.time_ns() // 1_000_000

    def __call__(self) -> int:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += int(seconds * 1000)


@pytest.fixture
def clock() -> Clock:
    return Clock()


StoreFactory = Callable[[StoreSettings], SessionStore]


@pytest.fixture(params=["memory", "redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def make_store(store_kind: str, request: pytest.FixtureRequest) -> StoreFactory:
    """Build a store of the parametrised kind with the given settings."""

    def factory(settings: StoreSettings) -> SessionStore:
        if store_kind == "memory":
            return MemoryStore(settings)
        if store_kind == "cluster":
            return RedisStore(request.getfixturevalue("redis_cluster").url, settings)
        url = request.getfixturevalue("redis_url")
        return RedisStore(url, settings)

    return factory


@pytest.fixture
def settings(key_prefix: str) -> StoreSettings:
    return StoreSettings(
        key_prefix=key_prefix, ttl=60.0, end_ttl=30.0, max_age=20.0, keyring=TEST_KEYRING
    )


@pytest.fixture
def config(settings: StoreSettings) -> Config:
    # No agent: these tests read the client's frames one by one. Tests of the relay
    # start a demo agent of their own (tests/support/agents.py).
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
async def gateway(
    config: Config, settings: StoreSettings, make_store: StoreFactory, clock: Clock
) -> AsyncIterator[Gateway]:
    """A gateway on 127.0.0.1, a free port, with the parametrised store and a settable clock."""
    async with Gateway(
        config,
        store=make_store(settings),
        metrics=Metrics(),
        clock=clock,
        delays=lambda: [0.01, 0.02, 0.05],
    ) as gw:
        yield gw
