"""Private redis-server processes for the tests, on free ports (never the shared 6379)."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import redis

from tests.support.tools import ensure

__all__ = ["RedisServer", "ensure_redis_server", "free_port", "spawn", "wait_for_pong"]


_GIVEN: set[int] = set()
"""Ports :func:`free_port` returned already: the kernel may offer a closed port again."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago, and that this process has
    not been given before (a cluster takes twelve in a row; two nodes on one port fail)."""
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port not in _GIVEN:
            _GIVEN.add(port)
            return port


def ensure_redis_server() -> str | None:
    """Return the path of redis-server, installing it with apt when running as root.

    Returns ``None`` when it is missing and cannot be installed.
    """
    return ensure("redis-server", "redis-server")


def spawn(port: int, workdir: Path, *options: str) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:``port`` with ``options``; it keeps its files and its
    log (``redis.log``) in ``workdir``, takes no snapshots, and a replica of it syncs at
    once rather than after the default 5 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(workdir),
            "--logfile",
            str(workdir / "redis.log"),
            "--repl-diskless-sync-delay",
            "0",
            *options,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_for_pong(
    proc: subprocess.Popen[bytes], port: int, deadline: float, describe: Callable[[], str]
) -> None:
    """Wait until the redis-server ``proc`` answers PING on ``port``.

    Raises:
        RuntimeError: If it exits or stays silent until ``deadline``; ``describe()`` says
            where to look.
    """
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"redis-server on {port} exited: {describe()}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on {port} did not answer PING: {describe()}")


class RedisServer:
    """One redis-server process; it may be killed and started again on the same port.

    Args:
        workdir: Where it keeps its append-only file.
        replica_of: The port of a primary to replicate.
        durable: Persist every write (``appendfsync always``) so that a restart
            after SIGKILL keeps every acknowledged write.
    """

    def __init__(
        self, workdir: Path, *, durable: bool = False, replica_of: int | None = None
    ) -> None:
        self.workdir = workdir
        self.durable = durable
        self.replica_of = replica_of
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        persistence = (
            ["--appendonly", "yes", "--appendfsync", "always"]
            if self.durable
            else ["--appendonly", "no"]
        )
        self.proc = spawn(
            self.port,
            self.workdir,
            *persistence,
            *(["--replicaof", "127.0.0.1", str(self.replica_of)] if self.replica_of else []),
        )
        log = self.workdir / "redis.log"
        wait_for_pong(self.proc, self.port, time.monotonic() + 10, lambda: f"see {log}")

    def wait_replicas(self, replicas: int = 1) -> None:
        """Wait until ``replicas`` replicas acknowledge this primary's writes.

        The primary lists a replica as ``online`` once the snapshot is sent, maybe before
        the replica has loaded it and acknowledges anything: a write it acknowledged
        (``WAIT``) proves it does.
        """
        client = redis.Redis.from_url(self.url)
        deadline = time.monotonic() + 10
        try:
            while True:
                info = client.info("replication")
                online = [
                    v for k, v in info.items() if k.startswith("slave") and "online" in str(v)
                ]
                if len(online) >= replicas:
                    client.set("wait-replicas-probe", "1")
                    if client.execute_command("WAIT", replicas, 1000) >= replicas:
                        return
                assert time.monotonic() < deadline, info
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL the server, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None
