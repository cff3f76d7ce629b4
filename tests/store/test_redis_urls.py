"""Each Redis URL scheme reaches Redis the way it names: rediss:// over TLS, unix:// over
a unix socket, redis:// over TCP, each packing commands with hiredis.

One real redis-server listens on all three; its TLS port takes no plaintext, so a
rediss:// store that left TLS out would fail here rather than talk in the clear.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from gateway.core.callerkey import CallerKey
from gateway.exceptions import StoreUnavailable
from gateway.store.base import StoreSettings
from gateway.store.redis_store import RedisStore
from tests.store.test_pipelining import busy
from tests.support.records import T0, candidate, write
from tests.support.redis_server import free_port, spawn, wait_for_pong


def _write_pem(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(workdir: Path) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for 127.0.0.1 with its key: (ca, cert, key)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hangon test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    return (
        _write_pem(workdir / "ca.pem", ca.public_bytes(pem)),
        _write_pem(workdir / "redis.pem", cert.public_bytes(pem)),
        _write_pem(
            workdir / "redis.key",
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
        ),
    )


class Listening:
    """One redis-server on a TCP port, a TLS port and a unix socket."""

    def __init__(self, workdir: Path) -> None:
        self.port, self.tls_port = free_port(), free_port()
        self.socket = workdir / "redis.sock"
        workdir.mkdir(parents=True, exist_ok=True)
        self.ca, cert, key = make_certificates(workdir)
        self.proc = spawn(
            self.port,
            workdir,
            "--tls-port",
            str(self.tls_port),
            "--tls-cert-file",
            str(cert),
            "--tls-key-file",
            str(key),
            "--tls-ca-cert-file",
            str(self.ca),
            "--tls-auth-clients",
            "no",
            "--unixsocket",
            str(self.socket),
            "--unixsocketperm",
            "700",
        )
        log = workdir / "redis.log"
        wait_for_pong(self.proc, self.port, time.monotonic() + 10, lambda: f"see {log}")

    def url(self, scheme: str) -> str:
        if scheme == "rediss":
            return f"rediss://127.0.0.1:{self.tls_port}/0?ssl_ca_certs={self.ca}"
        if scheme == "unix":
            return f"unix://{self.socket}?db=0"
        return f"redis://127.0.0.1:{self.port}/0"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def listening(redis_binary: str, tmp_path: Path) -> Iterator[Listening]:
    server = Listening(tmp_path / "redis")
    try:
        yield server
    finally:
        server.kill()


CONNECTIONS = {
    "redis": aioredis.Connection,
    "rediss": aioredis.SSLConnection,
    "unix": aioredis.UnixDomainSocketConnection,
}


@pytest.mark.parametrize("scheme", ["redis", "rediss", "unix"])
async def test_each_scheme_reaches_redis_its_own_way(
    listening: Listening, settings: StoreSettings, scheme: str
) -> None:
    """Concurrent turns (one pipeline) and a restore, over the scheme's own transport."""
    store = RedisStore(listening.url(scheme), settings)
    try:
        keys = [CallerKey("acme", "user", f"u{i}", "c") for i in range(20)]
        opened = await asyncio.gather(
            *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in keys)
        )
        sessions = [r.session for r in opened if r.session is not None]
        written = await asyncio.gather(
            *(
                store.write_turn(c, s.session_id, write(s, "t1", T0 + 1, name=f"n{i}"))
                for i, (c, s) in enumerate(zip(keys, sessions, strict=True))
            )
        )
        assert [w.version for w in written] == [1] * 20
        back = await store.restore(keys[7], token=None, candidate=candidate(), now_ms=T0 + 2)
        assert back.session is not None and back.session.state["form_answers"] == {"name": "n7"}
        assert isinstance(store.client, aioredis.Redis)
        pool = store.client.connection_pool
        assert issubclass(pool.connection_class, CONNECTIONS[scheme])
        conn = pool.make_connection()
        assert conn.pack_command("PING") == [b"*1\r\n$4\r\nPING\r\n"]  # hiredis, not Python
    finally:
        await store.aclose()


async def test_a_unix_socket_lost_mid_batch_fails_each_call_as_unavailable(
    listening: Listening, settings: StoreSettings
) -> None:
    """Redis killed while a batch waits for its replies on a unix socket: each call fails
    as unavailable (and is retried by the gateway), none with another error."""
    store = RedisStore(listening.url("unix"), settings, socket_timeout=5.0)
    keys = [CallerKey("acme", "user", f"k{i}", "c") for i in range(30)]
    try:
        opened = await asyncio.gather(
            *(store.restore(c, token=None, candidate=candidate(), now_ms=T0) for c in keys)
        )
        sessions = [r.session for r in opened if r.session is not None]
        started = threading.Event()
        thread = busy(listening.url("redis"), 3000, started)
        started.wait(5)
        await asyncio.sleep(0.2)  # the busy script runs
        calls = [
            asyncio.ensure_future(store.write_turn(c, s.session_id, write(s, "t1", T0 + 1)))
            for c, s in zip(keys, sessions, strict=True)
        ]
        await asyncio.sleep(0.3)  # sent, waiting behind the busy script
        listening.kill()
        async with asyncio.timeout(5):
            results = await asyncio.gather(*calls, return_exceptions=True)
        thread.join(5)
        assert all(isinstance(r, StoreUnavailable) for r in results), results[:3]
    finally:
        await store.aclose()
