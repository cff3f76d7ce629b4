"""The Redis Cluster harness: three primaries that split the slots, serve a cluster client,
survive a node killed and restarted on its port, and fail over to replicas."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster as ClusterClient

from tests.support.redis_cluster import RedisCluster


@pytest.fixture
async def client(redis_cluster: RedisCluster) -> AsyncIterator[ClusterClient]:
    client = ClusterClient.from_url(redis_cluster.redis_url)
    yield client
    await client.aclose()


def owner(client: ClusterClient, key: str) -> int:
    """The port of the primary that serves ``key``, as the client's slot table says."""
    node = client.get_node_from_key(key)
    assert node is not None
    return int(node.port)


async def test_keys_spread_over_primaries(
    redis_cluster: RedisCluster, client: ClusterClient
) -> None:
    """Keys tagged {a} and {b} live on different primaries and read back through the client."""
    assert redis_cluster.url == f"redis+cluster://127.0.0.1:{redis_cluster.ports[0]}"
    suffix = uuid.uuid4().hex
    a, b = f"{{a}}x-{suffix}", f"{{b}}y-{suffix}"
    try:
        await client.set(a, "1")
        await client.set(b, "2")
        assert await client.get(a) == b"1"
        assert await client.get(b) == b"2"
        assert owner(client, a) != owner(client, b)
        assert {owner(client, a), owner(client, b)} <= set(redis_cluster.ports)
    finally:
        await client.delete(a, b)


async def test_cluster_info_counts_three_primaries(redis_cluster: RedisCluster) -> None:
    """Every node reports state ok, three primaries with slots and all slots assigned."""
    for index in range(3):
        info = redis_cluster.cluster_info(index)
        assert info["cluster_state"] == "ok"
        assert info["cluster_size"] == "3"
        assert info["cluster_known_nodes"] == "3"
        assert info["cluster_slots_assigned"] == "16384"


async def test_killed_primary_restarts_with_its_data(own_redis_cluster: RedisCluster) -> None:
    """A primary killed after an acked write comes back on its port, and the key with it."""
    cluster = own_redis_cluster
    client = ClusterClient.from_url(cluster.redis_url)
    try:
        key = f"{{b}}durable-{uuid.uuid4().hex}"  # slot 3300: the first primary's
        await client.set(key, "kept")
        assert owner(client, key) == cluster.ports[0]
        cluster.kill(0)
        await asyncio.to_thread(cluster.wait_state, "fail")
        await asyncio.to_thread(cluster.restart, 0)
        assert await client.get(key) == b"kept"
    finally:
        await client.aclose()


async def test_replica_takes_over_killed_primary(
    redis_cluster_binaries: None, tmp_path: Path
) -> None:
    """With replicas=1 a killed primary's replica serves its slots, and the old one rejoins."""
    with RedisCluster(tmp_path / "cluster", replicas=1, node_timeout=1.0) as cluster:
        assert len(cluster.replica_ports) == 3
        assert cluster.cluster_info()["cluster_known_nodes"] == "6"
        key = f"{{b}}replicated-{uuid.uuid4().hex}"  # slot 3300: the first primary's
        primary = redis.Redis(port=cluster.ports[0])
        try:
            primary.set(key, "kept")
            assert primary.execute_command("WAIT", 1, 2000) == 1
        finally:
            primary.close()
        cluster.kill(0)
        await asyncio.to_thread(cluster.wait_failover, 0)
        client = ClusterClient.from_url(f"redis://127.0.0.1:{cluster.ports[1]}")
        try:
            assert await client.get(key) == b"kept"
            assert owner(client, key) == cluster.replica_ports[0]
            await asyncio.to_thread(cluster.restart, 0)
            assert await client.get(key) == b"kept"
        finally:
            await client.aclose()
