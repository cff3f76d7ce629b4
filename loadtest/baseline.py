"""Calibration baseline: what a bare websockets server costs on this machine, now.

hangon's load tests report their costs as ratios to these numbers, measured in the same run
on the same machine, because shared machines change from hour to hour. This starts
``python -m loadtest.bare`` on a free loopback port, opens ``--sessions`` connections that
each send one message and wait for the answer, and samples the server's CPU and RSS before
and once they are all open and idle. Then it drops them all at once, as the storm tool's
``drop`` mode does (each client aborts its TCP connection), opens as many again and samples
the server's CPU once they are all answered: the cost of a reconnect storm to a server that
restores nothing. Then it sends ``--messages`` messages to the server in
echo mode over at most 1000 connections, each sending its next message when the previous
one is acknowledged, and samples the server's CPU again. The drop storm and the echo run
``--rounds`` times each (3 by default) and report the median round, with the lowest and
highest beside it: the bare server's own figure moves by a third between runs minutes
apart on a shared machine, and one slow round must not make a ratio. Only the server
process is measured, never this load generator. It prints one JSON report.

    python -m loadtest.baseline --sessions 10000 --messages 100000 --json baseline.json

Other tools import :func:`measure_bare` to run the baseline in the same run as their own
measurement, and :func:`open_connections` to open their own connections the same way.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import WebSocketException
from websockets.protocol import State
from websockets.uri import parse_uri

from gateway.cli import tune_gc
from loadtest.bare import BareServer
from loadtest.net import (
    ProcessSample,
    check_loopback,
    raise_nofile_limit,
    source_address,
)

__all__ = [
    "ECHO_CONNECTIONS",
    "HELLO",
    "IN_FLIGHT",
    "ROUNDS",
    "ConnectResult",
    "main",
    "measure_bare",
    "measure_connect",
    "measure_echo",
    "open_connections",
    "parse",
    "send_messages",
    "settled_sample",
]

IN_FLIGHT = 500
"""Connections being opened at once: enough to keep the server busy, few enough that the
kernel's SYN and accept queues (``tcp_max_syn_backlog``, the server's backlog of 2048) never
overflow, which would add one-second SYN retransmits to the latencies."""
ECHO_CONNECTIONS = 1000
"""Most connections the echo measurement spreads its messages over."""
ROUNDS = 3
"""Drop storms and echo runs measured by default; each figure is their median."""
HELLO = b'{"type":"hello"}'
"""The message each connection sends (as a text frame) unless told otherwise."""


@dataclass(slots=True)
class ConnectResult:
    """What :func:`open_connections` did: the connections it opened, how long that took, and
    each one's latency."""

    connections: list[ClientConnection] = field(default_factory=list)
    """Connections that were answered, still open; :meth:`aclose` closes them."""
    latencies_ms: list[float] = field(default_factory=list)
    """Per answered connection, milliseconds from starting to connect to the answer."""
    errors: list[Exception] = field(default_factory=list)
    """Why each of the other connections failed (refused, timed out, closed)."""
    seconds: float = 0.0
    """Wall time from the first connect to the last answer or failure."""

    @property
    def rate_per_s(self) -> float:
        """Answered connections per second of wall time."""
        return len(self.latencies_ms) / self.seconds if self.seconds > 0 else 0.0

    def latency_ms(self) -> dict[str, float]:
        """p50, p95, p99 and max of :attr:`latencies_ms` (nearest rank), rounded to 0.01 ms."""
        ordered = sorted(self.latencies_ms) or [float("nan")]
        rank = {"p50": 50, "p95": 95, "p99": 99}
        summary = {
            k: ordered[min(len(ordered) - 1, len(ordered) * q // 100)] for k, q in rank.items()
        }
        summary["max"] = ordered[-1]
        return {k: round(v, 2) for k, v in summary.items()}

    async def aclose(self, *, timeout: float = 30.0) -> None:
        """Close every connection with a closing handshake, so that the server closes TCP
        first and keeps the TIME_WAIT ports; abort those still open after ``timeout``."""
        connections, self.connections = self.connections, []
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*(ws.close() for ws in connections), return_exceptions=True)
        finally:
            for ws in connections:
                if ws.state is not State.CLOSED:
                    ws.transport.abort()


_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
"""Linux's ``IP_BIND_ADDRESS_NO_PORT``: ``bind()`` takes the address only and ``connect()``
picks the port. ``bind()`` to port 0, as ``local_addr`` does, searches for a port free for
every destination; with 10,000 connections open that took five times the kernel CPU and halved
the connect rate."""


async def _tcp_connect(host: str, port: int, source: tuple[str, int]) -> socket.socket:
    """Return a TCP socket connected from ``source``'s address to ``host``:``port``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_IP, _BIND_ADDRESS_NO_PORT, 1)
        sock.bind(source)
        await asyncio.get_running_loop().sock_connect(sock, (host, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def _open_one(url: str, index: int, host: str, message: bytes) -> ClientConnection:
    """Open connection ``index``, send ``message`` and wait for the first answer."""
    source = source_address(index, host)
    port = parse_uri(url).port
    # Given a socket, websockets speaks over it and aborts it if the handshake fails.
    sock = None if source is None else await _tcp_connect(host, port, source)
    ws = await connect(
        url,
        compression=None,
        ping_interval=None,  # the server must not spend CPU on pongs
        open_timeout=None,  # the caller's timeout covers the handshake and the answer
        sock=sock,
    )
    try:
        await ws.send(message, text=True)
        await ws.recv(decode=False)
    except BaseException:
        ws.transport.abort()
        raise
    return ws


async def open_connections(
    url: str,
    n: int,
    *,
    in_flight: int = IN_FLIGHT,
    message: bytes = HELLO,
    open_timeout: float = 30.0,
    timeout: float = 600.0,
) -> ConnectResult:
    """Open ``n`` connections to ``url``, at most ``in_flight`` at a time, each sending
    ``message`` and waiting for the answer.

    Connections past the first :data:`~loadtest.net.PORTS_PER_ADDRESS` come from 127.0.0.2
    and on, so that ephemeral ports do not run out.

    Args:
        url: a ``ws://`` URL on a loopback address.
        n: connections to open.
        in_flight: connections being opened (connect, handshake, first answer) at once.
        message: sent as a text frame on each connection once it is open.
        open_timeout: seconds one connection may take to be answered; it fails after that.
        timeout: seconds for all of them; on expiry every connection is closed.

    Returns:
        The answered connections, still open (close them with ``aclose()``), their
        latencies and the errors of the others.

    Raises:
        SystemExit: ``url`` is not a loopback address.
        TimeoutError: ``timeout`` expired.
    """
    host = check_loopback(url)
    result = ConnectResult()
    indices = iter(range(n))
    start = time.perf_counter()

    async def worker() -> None:
        for i in indices:  # shared by the workers: each index is taken once
            began = time.perf_counter()
            try:
                async with asyncio.timeout(open_timeout):
                    ws = await _open_one(url, i, host, message)
            except (OSError, TimeoutError, WebSocketException) as exc:
                result.errors.append(exc)
                continue
            result.latencies_ms.append((time.perf_counter() - began) * 1000)
            result.connections.append(ws)

    try:
        async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
            for _ in range(min(in_flight, n)):
                group.create_task(worker())
    except BaseException:
        await result.aclose()
        raise
    result.seconds = time.perf_counter() - start
    return result


async def _converse(ws: ClientConnection, count: int, message: bytes) -> None:
    """Send ``message`` ``count`` times on ``ws``, each time waiting for the answer."""
    for _ in range(count):
        await ws.send(message, text=True)
        await ws.recv(decode=False)


async def send_messages(
    connections: Sequence[ClientConnection],
    total: int,
    *,
    message: bytes = HELLO,
    timeout: float = 600.0,
) -> None:
    """Send ``total`` messages spread evenly over ``connections``, each connection sending its
    next message when the previous one is answered.

    Raises:
        ValueError: there are no connections.
        TimeoutError: ``timeout`` expired.
        websockets.exceptions.ConnectionClosed: a connection closed before it was done.
    """
    count = len(connections)
    if count == 0:
        raise ValueError("no connections to send on")
    async with asyncio.timeout(timeout), asyncio.TaskGroup() as group:
        for k, ws in enumerate(connections):
            group.create_task(_converse(ws, total // count + (k < total % count), message))


async def settled_sample(
    server: BareServer, *, minimum: float = 1.0, limit: float = 5.0, interval: float = 0.25
) -> ProcessSample:
    """Sample ``server`` after ``minimum`` seconds, once its RSS has stopped changing for one
    ``interval`` (or after ``limit`` seconds)."""
    await asyncio.sleep(minimum)
    last = server.sample()
    for _ in range(max(0, round((limit - minimum) / interval))):
        await asyncio.sleep(interval)
        now = server.sample()
        if now.rss_bytes == last.rss_bytes:
            return now
        last = now
    return last


def _require_all(result: ConnectResult, n: int) -> None:
    """Raise if any of the ``n`` connections failed: a baseline must be exact."""
    if result.errors:
        raise RuntimeError(
            f"{len(result.errors)} of {n} connections to the bare server failed, "
            f"first: {result.errors[0]!r}"
        )


async def measure_connect(
    sessions: int, *, in_flight: int = IN_FLIGHT, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Open ``sessions`` connections to a bare server in connect mode; report the wall time,
    latencies, and the server's CPU per connection and RSS per idle connection. Then, in
    each of ``rounds`` drop storms, drop them all at once and open as many again; report
    the median storm's wall time and the server's CPU per reconnect (the drop included),
    with the lowest and highest round's CPU beside it."""
    server = await BareServer.start("connect")
    opened = ConnectResult()
    storms: list[tuple[float, float]] = []
    try:
        before = await settled_sample(server, minimum=0.5)
        opened = await open_connections(server.url, sessions, in_flight=in_flight)
        _require_all(opened, sessions)
        idle = await settled_sample(server)
        first = opened
        for _ in range(rounds):
            dropped, opened = opened, ConnectResult()
            storm_before = server.sample()
            for ws in dropped.connections:
                ws.transport.abort()  # no closing handshake, as when a network drops
            opened = await open_connections(server.url, sessions, in_flight=in_flight)
            _require_all(opened, sessions)
            storm_after = server.sample()
            cpu_ms = (storm_after.cpu_seconds - storm_before.cpu_seconds) * 1000 / sessions
            storms.append((opened.seconds, cpu_ms))
    finally:
        await opened.aclose()
        await server.aclose()
    cpus = [cpu for _, cpu in storms]
    storm = {
        "seconds": round(statistics.median(seconds for seconds, _ in storms), 3),
        "server_cpu_ms_per_reconnect": round(statistics.median(cpus), 4),
        "server_cpu_ms_per_reconnect_lowest": round(min(cpus), 4),
        "server_cpu_ms_per_reconnect_highest": round(max(cpus), 4),
    }
    return {
        "seconds": round(first.seconds, 3),
        "rate_per_s": round(first.rate_per_s, 1),
        "latency_ms": first.latency_ms(),
        "server_cpu_ms_per_connection": round(
            (idle.cpu_seconds - before.cpu_seconds) * 1000 / sessions, 4
        ),
        "server_rss_kib_per_connection": round(
            (idle.rss_bytes - before.rss_bytes) / 1024 / sessions, 2
        ),
        "drop_storm": storm,
    }


async def measure_echo(
    sessions: int, messages: int, *, in_flight: int = IN_FLIGHT, rounds: int = ROUNDS
) -> dict[str, Any]:
    """Send ``messages`` messages to a bare server in echo mode over at most
    :data:`ECHO_CONNECTIONS` connections, ``rounds`` times; report the median round's
    server CPU per message, with the lowest and highest beside it."""
    server = await BareServer.start("echo")
    opened = ConnectResult()
    cpus: list[float] = []
    try:
        n = min(sessions, ECHO_CONNECTIONS)
        opened = await open_connections(server.url, n, in_flight=in_flight)
        _require_all(opened, n)
        for _ in range(rounds):
            before = server.sample()
            await send_messages(opened.connections, messages)
            after = server.sample()
            cpus.append(after.cpu_seconds - before.cpu_seconds)
    finally:
        await opened.aclose()
        await server.aclose()
    cpu = statistics.median(cpus)
    return {
        "server_cpu_us_per_message": round(cpu * 1e6 / messages, 2),
        "server_cpu_us_per_message_lowest": round(min(cpus) * 1e6 / messages, 2),
        "server_cpu_us_per_message_highest": round(max(cpus) * 1e6 / messages, 2),
        # None when the work took less than one clock tick of CPU: too little to measure.
        "messages_per_cpu_second": round(messages / cpu) if cpu > 0 else None,
    }


def _machine() -> dict[str, Any]:
    """The machine and software the numbers came from."""
    return {
        "cpus": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "loadavg_1m": os.getloadavg()[0],
        **{name: metadata.version(name) for name in ("websockets", "uvloop", "orjson")},
    }


async def measure_bare(
    sessions: int,
    messages: int,
    *,
    in_flight: int = IN_FLIGHT,
    rounds: int = ROUNDS,
    timeout: float = 900.0,
) -> dict[str, Any]:
    """Measure a bare websockets server on this machine, now; return the JSON report.

    Args:
        sessions: connections opened and held idle at once.
        messages: messages sent in echo mode, over ``min(sessions, 1000)`` connections.
        in_flight: connections being opened at once.
        rounds: drop storms and echo runs measured; each figure is their median.
        timeout: seconds for the whole measurement.

    Raises:
        ValueError: ``sessions``, ``messages`` or ``rounds`` is below 1.
        RuntimeError: a connection failed, or the server could not start or died.
        TimeoutError: ``timeout`` expired.
    """
    if sessions < 1 or messages < 1 or rounds < 1:
        raise ValueError(
            f"sessions ({sessions}), messages ({messages}) and rounds ({rounds}) must be at least 1"
        )
    limit = raise_nofile_limit(2 * sessions + 1000)
    if limit < sessions + 100:
        raise RuntimeError(f"open-file limit {limit} is too low for {sessions} connections")
    machine = _machine()  # the load average before this run adds to it
    async with asyncio.timeout(timeout):
        connect_report = await measure_connect(sessions, in_flight=in_flight, rounds=rounds)
        echo_report = await measure_echo(sessions, messages, in_flight=in_flight, rounds=rounds)
    return {
        "tool": "hangon-baseline",
        "sessions": sessions,
        "messages": messages,
        "rounds": rounds,
        "connect": connect_report,
        "echo": echo_report,
        "machine": machine,
        "date": datetime.date.today().isoformat(),
    }


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.baseline", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--sessions", type=int, required=True, help="connections held at once")
    parser.add_argument("--messages", type=int, default=100_000, help="echo messages in all")
    parser.add_argument("--in-flight", type=int, default=IN_FLIGHT, help="connects at once")
    parser.add_argument(
        "--rounds", type=int, default=ROUNDS, help="drop storms and echo runs (median shown)"
    )
    parser.add_argument("--json", type=Path, help="also write the report to this file")
    return parser.parse_args(argv)


async def _cancelled_by_sigterm(
    sessions: int, messages: int, in_flight: int, rounds: int
) -> dict[str, Any]:
    """Run :func:`measure_bare`; SIGTERM cancels it, as Ctrl-C does, so the server is stopped."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await measure_bare(sessions, messages, in_flight=in_flight, rounds=rounds)


def main(argv: Sequence[str] | None = None) -> None:
    """Measure under uvloop; print the report and write it to ``--json`` if given."""
    args = parse(argv)
    tune_gc()
    try:
        report = uvloop.run(
            _cancelled_by_sigterm(args.sessions, args.messages, args.in_flight, args.rounds)
        )
    except asyncio.CancelledError:
        raise SystemExit(128 + signal.SIGTERM) from None
    text = json.dumps(report, indent=2)
    print(text)
    if args.json is not None:
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
