"""``--ack-replicas``: a write is acknowledged only once a replica holds it (Redis WAIT on
the write's own connection), so acknowledged turns survive a failover, on one Redis with a
replica and on a Redis Cluster whose primary is killed."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import redis

from gateway.core.callerkey import parse_caller
from gateway.exceptions import StoreUnavailable
from gateway.store.base import StoreSettings, session_keys
from gateway.store.redis_store import RedisStore
from tests.support.records import T0, candidate, new_session, write
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.usefixtures("redis_binary")


async def test_write_waits_for_the_replica(tmp_path: Path) -> None:
    """With a replica up, turns are acknowledged; with it down, the write is not acknowledged
    (store unavailable, to be retried) though the primary has it; once the replica is back, the
    retry of the same write is acknowledged as applied, without applying it twice."""
    primary = RedisServer(tmp_path / "primary")
    primary.start()
    replica = RedisServer(tmp_path / "replica", replica_of=primary.port)
    replica.start()
    store = RedisStore(
        primary.url, StoreSettings(key_prefix="wait:"), socket_timeout=0.5, ack_replicas=1
    )
    caller = parse_caller({"user_id": "u-wait", "call_id": "c"})
    try:
        primary.wait_replicas()
        s = await new_session(store, caller)
        first = write(s, "t1", T0 + 1, name="Ada")
        assert (await store.write_turn(caller, s.session_id, first)).applied
        s.commit(first)
        replica.kill()
        second = write(s, "t2", T0 + 2, date="Friday")
        with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
            await store.write_turn(caller, s.session_id, second)
        # A new replica (on a fresh port), as after a replacement.
        replica = RedisServer(tmp_path / "replica", replica_of=primary.port)
        replica.start()
        primary.wait_replicas()
        again = await store.write_turn(caller, s.session_id, second)
        assert again.applied and again.version == 2
    finally:
        await store.aclose()
        replica.kill()
        primary.kill()


async def test_cluster_failover_keeps_acknowledged_turns(
    redis_cluster_binaries: None, tmp_path: Path
) -> None:
    """On a cluster with a replica per primary and ack_replicas=1, every acknowledged turn is
    there after the primary holding it is killed and its replica takes over."""
    with RedisCluster(tmp_path / "cluster", replicas=1, node_timeout=1.0) as cluster:
        settings = StoreSettings(key_prefix="failover:")
        store = RedisStore(cluster.url, settings, ack_replicas=1)
        callers = [parse_caller({"user_id": f"u{i}", "call_id": "c"}) for i in range(30)]
        acked = {}
        try:
            for caller in callers:
                restored = await store.restore(caller, token=None, candidate=candidate(), now_ms=T0)
                s = restored.session
                assert s is not None
                turn = write(s, "t1", T0 + 1, name=caller.subject)
                assert (await store.write_turn(caller, s.session_id, turn)).applied
                acked[caller] = turn.state
        finally:
            await store.aclose()
        cluster.kill(0)
        await asyncio.to_thread(cluster.wait_failover, 0)
        # The URL names the node just killed; a client needs a live one to find the cluster.
        store = RedisStore(f"redis+cluster://127.0.0.1:{cluster.ports[1]}", settings)
        try:
            for caller in callers:
                back = await store.restore(caller, token=None, candidate=candidate(), now_ms=T0 + 2)
                assert back.session is not None and back.session.version == 1
                assert back.session.state["form_answers"] == acked[caller]["form_answers"]
        finally:
            await store.aclose()


async def test_cluster_write_redirected_by_a_moved_slot_still_waits(
    redis_cluster_binaries: None, tmp_path: Path
) -> None:
    """The session's slot moves to another primary behind the client's back and that
    primary's replica is down: the redirected write is not acknowledged (the WAIT goes with
    it to the new primary), where a WAIT left on the old node would have vouched for it."""
    with RedisCluster(tmp_path / "cluster", replicas=1, node_timeout=1.0) as cluster:
        store = RedisStore(
            cluster.url, StoreSettings(key_prefix="moved:"), socket_timeout=0.5, ack_replicas=1
        )
        caller = parse_caller({"user_id": "u-moved", "call_id": "c"})
        key = session_keys("moved:", caller, store.settings.keyring)[0]
        nodes = {port: redis.Redis(port=port) for port in cluster.ports}
        try:
            s = await new_session(store, caller)
            first = write(s, "t1", T0 + 1, name="Ada")
            assert (await store.write_turn(caller, s.session_id, first)).applied
            s.commit(first)
            slot = nodes[cluster.ports[0]].cluster("KEYSLOT", key)
            src = next(p for p in cluster.ports if nodes[p].cluster("COUNTKEYSINSLOT", slot))
            dst = next(p for p in cluster.ports if p != src)
            ids = {p: nodes[p].cluster("MYID") for p in cluster.ports}
            ids = {p: i.decode() if isinstance(i, bytes) else i for p, i in ids.items()}
            nodes[dst].execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", ids[src])
            nodes[src].execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", ids[dst])
            keys = nodes[src].execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100)
            nodes[src].execute_command("MIGRATE", "127.0.0.1", dst, "", 0, 5000, "KEYS", *keys)
            for p in cluster.ports:
                nodes[p].execute_command("CLUSTER", "SETSLOT", slot, "NODE", ids[dst])
            cluster.kill_replica(cluster.ports.index(dst))
            await asyncio.sleep(0.5)
            second = write(s, "t2", T0 + 2, date="Friday")
            with pytest.raises(StoreUnavailable, match="0 of 1 replicas"):
                await store.write_turn(caller, s.session_id, second)
        finally:
            await store.aclose()
            for node in nodes.values():
                node.close()
