"""A private Redis Cluster for the tests: redis-server processes on free loopback ports."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import redis

from tests.support.redis_server import free_port, spawn, wait_for_pong
from tests.support.tools import Started

__all__ = ["RedisCluster"]

_PRIMARIES = 3


class _Node:
    """One cluster node: a redis-server that may be killed and started again on its ports."""

    def __init__(self, workdir: Path, port: int, bus_port: int) -> None:
        self.port = port
        self.bus_port = bus_port
        self.dir = workdir / f"node-{port}"
        self.log_path = self.dir / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, node_timeout: float) -> None:
        self.proc = spawn(
            self.port,
            self.dir,
            # Explicit, because the default (port + 10000) may be past 65535.
            "--cluster-port",
            str(self.bus_port),
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            str(self.dir / f"nodes-{self.port}.conf"),
            "--cluster-node-timeout",
            str(int(node_timeout * 1000)),
            # A replica takes over whatever the age of its data, so a failover never stalls.
            "--cluster-replica-validity-factor",
            "0",
            # A primary stopped with SIGTERM exits at once instead of waiting (10 s by
            # default) for replicas that are being stopped too.
            "--shutdown-timeout",
            "0",
            # Every write persisted: a node killed and restarted keeps what it acked.
            "--appendonly",
            "yes",
            "--appendfsync",
            "always",
        )

    def wait_pong(self, deadline: float) -> None:
        assert self.proc is not None
        wait_for_pong(self.proc, self.port, deadline, lambda: "\n" + self.log_tail())

    def wait_synced(self, deadline: float) -> None:
        """Wait until this replica has its primary's data and has written it to its AOF.

        A replica refuses SIGTERM while it rewrites its AOF after a full sync.
        """
        while True:
            try:
                replication = self.command("INFO", "replication")
                persistence = self.command("INFO", "persistence")
            except (OSError, redis.RedisError):
                replication = persistence = ""
            if (
                "master_link_status:up" in replication
                and "aof_rewrite_in_progress:0" in persistence
                and "aof_rewrite_scheduled:0" in persistence
            ):
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(f"replica {self.port} did not sync:\n{self.log_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM, repeated: Redis ignores one that comes while it rewrites its AOF."""
        deadline = time.monotonic() + timeout
        while self.proc is not None and self.proc.poll() is None:
            if time.monotonic() >= deadline:
                self.proc.kill()
                self.proc.wait()
                break
            self.proc.terminate()
            try:
                self.proc.wait(timeout=0.5)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None

    def info(self) -> dict[str, str]:
        """CLUSTER INFO of this node; empty when it does not answer."""
        try:
            text = self.command("CLUSTER", "INFO")
        except (OSError, redis.RedisError):
            return {}
        return dict(line.split(":", 1) for line in text.split() if ":" in line)

    def command(self, *args: str) -> str:
        """Send one command and return its bulk-string reply, unparsed by redis-py."""
        conn = redis.Connection(port=self.port, socket_timeout=0.5, socket_connect_timeout=0.5)
        try:
            conn.send_command(*args)
            reply = conn.read_response()
        finally:
            conn.disconnect()
        assert isinstance(reply, bytes), reply
        return reply.decode()

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return f"[{self.port}] (no log)"
        return "\n".join(f"[{self.port}] {line}" for line in text.splitlines()[-lines:])


class _Entry(NamedTuple):
    """One line of ``CLUSTER NODES``."""

    id: str
    port: int
    primary_id: str | None
    """The primary's ID for a replica; None for a primary."""
    first_slot: int | None
    """First slot of a primary that serves slots; None otherwise."""


def _cluster_nodes(node: _Node) -> list[_Entry]:
    """``CLUSTER NODES`` as ``node`` sees it; empty when it does not answer."""
    try:
        text = node.command("CLUSTER", "NODES")
    except (OSError, redis.RedisError):
        return []
    entries = []
    for line in text.splitlines():
        # <id> <ip:port@bus> <flags> <primary id or -> <ping> <pong> <epoch> <link> <slots>...
        fields = line.split()
        primary = "master" in fields[2].split(",")
        entries.append(
            _Entry(
                id=fields[0],
                port=int(fields[1].split("@")[0].rsplit(":", 1)[1]),
                primary_id=None if primary else fields[3],
                first_slot=int(fields[8].split("-")[0]) if primary and len(fields) > 8 else None,
            )
        )
    return entries


class RedisCluster(Started):
    """A Redis Cluster of three primaries, each a redis-server process on 127.0.0.1.

    Each node has its own directory under ``workdir`` with its log, its append-only
    file (``appendfsync always``) and its ``nodes-PORT.conf``, so a node killed and
    restarted on the same port keeps its data and its place in the cluster.

    Args:
        workdir: Where the nodes keep their files.
        replicas: Replicas per primary, 0 or 1; a replica takes over its killed
            primary after ``node_timeout``.
        node_timeout: Seconds before the others mark an unreachable node failed
            (``cluster-node-timeout``); short, so that fault tests need little waiting.
    """

    def __init__(self, workdir: Path, *, replicas: int = 0, node_timeout: float = 2.0) -> None:
        if replicas not in (0, 1):
            raise ValueError(f"replicas={replicas!r}: must be 0 or 1")
        self.workdir = workdir
        self.replicas = replicas
        self.node_timeout = node_timeout
        self._nodes = [
            _Node(workdir, free_port(), free_port()) for _ in range(_PRIMARIES * (1 + replicas))
        ]
        self._primaries = self._nodes[:_PRIMARIES]
        self._replicas = self._nodes[_PRIMARIES:]

    @property
    def ports(self) -> list[int]:
        """Ports of the nodes created as primaries, in slot order (the first owns slot 0).

        After a failover a node keeps its index here, though it may now be a replica.
        """
        return [n.port for n in self._primaries]

    @property
    def replica_ports(self) -> list[int]:
        """Port of each primary's replica, in the order of :attr:`ports`; empty without."""
        return [n.port for n in self._replicas]

    def kill_replica(self, index: int) -> None:
        """SIGKILL the replica of primary ``index``."""
        self._replicas[index].kill()

    @property
    def url(self) -> str:
        """``redis+cluster://`` URL of the first primary, the scheme the gateway accepts."""
        return f"redis+cluster://127.0.0.1:{self.ports[0]}"

    @property
    def redis_url(self) -> str:
        """``redis://`` URL of the first primary, for redis-py's ``RedisCluster.from_url``."""
        return f"redis://127.0.0.1:{self.ports[0]}"

    def start(self, timeout: float = 30) -> None:
        """Start every node, join them with ``redis-cli --cluster create``, wait for ``ok``.

        Raises:
            RuntimeError: When a node or the cluster does not come up within
                ``timeout`` seconds; the message has the tail of every log.
        """
        deadline = time.monotonic() + timeout
        try:
            for node in self._nodes:
                node.start(self.node_timeout)
            for node in self._nodes:
                node.wait_pong(deadline)
            self._create(deadline)
            self.wait_state("ok", timeout=max(deadline - time.monotonic(), 0.1))
            self._settle(deadline)
            for replica in self._replicas:
                replica.wait_synced(deadline)
        except BaseException:
            self.stop()
            raise

    def _create(self, deadline: float) -> None:
        cli = shutil.which("redis-cli")
        if cli is None:
            raise RuntimeError("redis-cli not found (apt-get install redis-tools)")
        command = [cli, "--cluster", "create"]
        command += [f"127.0.0.1:{n.port}" for n in self._nodes]
        if self.replicas:
            command += ["--cluster-replicas", str(self.replicas)]
        command.append("--cluster-yes")
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=max(deadline - time.monotonic(), 1),
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"redis-cli --cluster create timed out\n{self._logs()}") from exc
        if done.returncode != 0:
            raise RuntimeError(
                f"redis-cli --cluster create failed ({done.returncode}):\n"
                f"{done.stdout}{done.stderr}\n{self._logs()}"
            )

    def _settle(self, deadline: float) -> None:
        """Wait until every node sees the same layout, then order the nodes by it.

        Right after ``--cluster create`` the nodes still gossip: a node may see a replica
        as an empty primary for a moment, and a client would get the same wrong picture.
        """
        while True:
            layouts = [self._layout(n) for n in self._nodes]
            first = layouts[0]
            if first is not None and all(layout == first for layout in layouts):
                primaries, replicas = first
                self._primaries = primaries
                self._replicas = replicas
                return
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    "cluster nodes did not agree on primaries and replicas:\n"
                    + self._nodes[0].command("CLUSTER", "NODES")
                    + self._logs()
                )
            time.sleep(0.05)

    def _layout(self, node: _Node) -> tuple[list[_Node], list[_Node]] | None:
        """Primaries in slot order and their replicas as ``node`` sees them; None if incomplete."""
        entries = _cluster_nodes(node)
        if len(entries) != len(self._nodes):
            return None
        by_port = {n.port: n for n in self._nodes}
        first_slot = {e.id: e.first_slot for e in entries if e.first_slot is not None}
        replica_of = {e.primary_id: e for e in entries if e.primary_id is not None}
        primaries = sorted(first_slot, key=first_slot.__getitem__)
        if len(primaries) != _PRIMARIES or len(replica_of) != _PRIMARIES * self.replicas:
            return None
        if self.replicas and set(replica_of) != set(primaries):
            return None
        ports = {e.id: e.port for e in entries}
        return (
            [by_port[ports[p]] for p in primaries],
            [by_port[replica_of[p].port] for p in primaries if replica_of],
        )

    def cluster_info(self, index: int = 0) -> dict[str, str]:
        """``CLUSTER INFO`` of primary ``index`` as a dict; empty when it does not answer."""
        return self._primaries[index].info()

    def wait_state(self, state: str = "ok", timeout: float = 15) -> None:
        """Wait until every running node reports ``cluster_state:<state>`` and knows all nodes.

        Raises:
            RuntimeError: After ``timeout`` seconds, with each node's state and log tail.
        """
        deadline = time.monotonic() + timeout
        running = [n for n in self._nodes if n.proc is not None]
        while True:
            infos = [n.info() for n in running]
            if all(
                i.get("cluster_state") == state
                and i.get("cluster_known_nodes") == str(len(self._nodes))
                for i in infos
            ):
                return
            if time.monotonic() >= deadline:
                states = ", ".join(
                    f"{n.port}: {i.get('cluster_state', 'no answer')}"
                    for n, i in zip(running, infos, strict=True)
                )
                raise RuntimeError(
                    f"cluster not {state} within {timeout} s ({states})\n{self._logs()}"
                )
            time.sleep(0.05)

    def wait_failover(self, index: int, timeout: float = 15) -> None:
        """Wait until the replica of killed primary ``index`` serves its slots, state ``ok``.

        Raises:
            RuntimeError: Without replicas, or after ``timeout`` seconds.
        """
        if not self.replicas:
            raise RuntimeError("no replica to fail over to: RedisCluster(..., replicas=1)")
        port = self._replicas[index].port
        deadline = time.monotonic() + timeout
        while True:
            running = [n for n in self._nodes if n.proc is not None]
            if all(
                any(e.port == port and e.first_slot is not None for e in _cluster_nodes(n))
                for n in running
            ):
                break
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"replica {port} did not take over within {timeout} s\n{self._logs()}"
                )
            time.sleep(0.05)
        self.wait_state("ok", timeout=max(deadline - time.monotonic(), 0.1))
        self._wait_agree(deadline)

    def _wait_agree(self, deadline: float) -> dict[int, int]:
        """Wait until every running node sees the same primaries; return port -> first slot."""
        while True:
            views = [
                {e.port: e.first_slot for e in _cluster_nodes(n) if e.first_slot is not None}
                for n in self._nodes
                if n.proc is not None
            ]
            if len(views[0]) == _PRIMARIES and all(v == views[0] for v in views):
                return views[0]
            if time.monotonic() >= deadline:
                raise RuntimeError(f"nodes disagree on the primaries: {views}\n{self._logs()}")
            time.sleep(0.05)

    def kill(self, index: int) -> None:
        """SIGKILL the node at ``ports[index]``, as a crash would."""
        self._primaries[index].kill()

    def restart(self, index: int, timeout: float = 15) -> None:
        """Start the node at ``ports[index]`` again on its ports (killing it first if it
        runs), then wait for ``ok`` and for the nodes to agree on the primaries.

        Its data and cluster membership come back from its append-only file and its
        ``nodes-PORT.conf``.
        """
        node = self._primaries[index]
        node.kill()
        node.start(self.node_timeout)
        deadline = time.monotonic() + timeout
        node.wait_pong(deadline)
        self.wait_state("ok", timeout=max(deadline - time.monotonic(), 0.1))
        # After a failover it comes back believing it is still the primary, until the
        # others tell it otherwise; then it is a replica and copies the new primary.
        primaries = self._wait_agree(deadline)
        if node.port not in primaries:
            node.wait_synced(deadline)

    def stop(self) -> None:
        """Stop every node and wait for it to exit."""
        for node in self._nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.terminate()
        for node in self._nodes:
            node.stop()

    def _logs(self) -> str:
        return "\n".join(n.log_tail() for n in self._nodes)
