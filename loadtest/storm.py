"""Reconnect storm: N sessions stream turns, lose their connections at once, come back, and
must each find exactly what was acknowledged.

    python -m loadtest storm --url ws://127.0.0.1:8799/ws --sessions 1000 --turns 5 \\
        --mode drop|kill|drain --gateway-cmd "hangon serve --port 8799 --redis-url ..."

Phases:

1. **connect**: every session opens (``gateway.client.Client``, at most
   ``--connect-concurrency`` handshakes at once, spread over 127.0.0.x source
   addresses) and gets its ``welcome``.
2. **turns**: each session sends ``--turns`` turns, one at a time, each with a
   ``form`` answer, and waits for each ack.
3. **storm**: each session sends one more turn and, before its ack can come,
   ``drop`` aborts every client connection at the same instant (no
   close frame); ``kill`` SIGKILLs the gateway and starts it again; ``drain``
   sends it SIGTERM, waits for it to exit and starts it again. Every client
   reconnects with the client library's own backoff and full jitter, honouring
   ``Retry-After`` and ``retry_after``.
4. **verify**: per session, the restored state must equal the last acknowledged
   one (same session, every form answer, the acked version), the turn that was
   in flight must be acked exactly once at the next version, a re-sent turn must
   be acked with its original version (applied once), and the agent's
   messages must have arrived exactly once, in order. Any violation names the
   session.

It reports connect rate, acked turns per second, restore latency percentiles,
time until all sessions were restored, connections shed and retried, Redis round
trips per turn (from the gateway's ``/metrics``) and the gateway's peak RSS and CPU
seconds; ``--baseline`` measures a bare websockets server in the same run (see
:mod:`loadtest.baseline`) and reports hangon's figures as ratios of it. The result
is JSON (``--json``) and a self-contained HTML report (``--html``, see
:mod:`loadtest.report`). Progress goes to stderr: a bar on a terminal, else one line
per phase. Only loopback targets; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlsplit

import jwt

from gateway.cli import tune_gc
from gateway.client import Client, Restored
from gateway.exceptions import ClientClosed
from loadtest.net import (
    check_loopback,
    raise_nofile_limit,
    sample_process,
    source_address,
)

__all__ = ["Gateway", "Session", "main", "run_storm"]

_LISTENING = re.compile(rb"listening host=\S+ port=(\d+)")
_IN_FLIGHT = "t-storm"
"""The turn each session sends as the storm strikes."""


def _percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)

    return {"p50": at(0.5), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 2)}


class Gateway:
    """The gateway under test, started (and restarted) by this tool from ``command``."""

    def __init__(self, command: str, log_path: Path) -> None:
        self.command = shlex.split(command)
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.cpu_before_restarts = 0.0
        """CPU seconds of the processes that were killed or stopped."""

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    def start(self, timeout: float = 30) -> None:
        with self.log_path.open("ab") as log:
            offset = log.tell()
            self.proc = subprocess.Popen(
                self.command, stdout=log, stderr=log, env={**os.environ, "PYTHONUNBUFFERED": "1"}
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                if _LISTENING.search(f.read()):
                    return
            if self.proc.poll() is not None:
                raise SystemExit(f"gateway exited at start; see {self.log_path}")
            time.sleep(0.05)
        raise SystemExit(f"gateway did not start in {timeout} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        sample = sample_process(self.pid) if self.pid else None
        return self.cpu_before_restarts + (sample.cpu_seconds if sample else 0.0)

    def stop(self, sig: signal.Signals, timeout: float = 60) -> None:
        assert self.proc is not None
        sample = sample_process(self.proc.pid)
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if sample is not None:
            self.cpu_before_restarts += sample.cpu_seconds  # a lower bound for SIGTERM


@dataclass
class Session:
    """One caller: what was acknowledged, and what it saw when it came back."""

    name: str
    client: Client
    answers: dict[str, int] = field(default_factory=dict)
    versions: dict[str, int] = field(default_factory=dict)
    """Turn ID to the version its ack named."""
    session_id: str | None = None
    seqs: list[int] = field(default_factory=list)
    restored_at: float | None = None
    dropped_at: float | None = None
    after: Restored | None = None
    """The first welcome after the storm."""
    reconnects: int = 0
    shed_hints: int = 0
    problems: list[str] = field(default_factory=list)
    in_flight: asyncio.Future[int] | None = None
    """A turn sent just before the storm, unacknowledged when it struck: it must be applied
    exactly once, whether it reached the gateway before the loss or is re-sent after it."""


class Monitor:
    """Samples the gateway's RSS every ``period`` seconds, and the restores over time."""

    def __init__(self, gateway: Gateway | None, pid: int | None, period: float = 0.25) -> None:
        self.gateway = gateway
        self.pid = pid
        self.period = period
        self.started = time.monotonic()
        self.rss: list[list[float]] = []
        self.peak_rss = 0
        self.events: dict[str, float] = {}
        """Seconds since the run began (the clock of ``rss``) at which each event happened."""

    def note(self, event: str) -> None:
        """Note that ``event`` happens now, on the clock of the RSS samples."""
        self.events[event] = round(time.monotonic() - self.started, 2)

    def current_pid(self) -> int | None:
        return self.gateway.pid if self.gateway is not None else self.pid

    async def run(self) -> None:
        while True:
            pid = self.current_pid()
            sample = sample_process(pid) if pid else None
            if sample is not None:
                self.peak_rss = max(self.peak_rss, sample.rss_bytes)
                at = round(time.monotonic() - self.started, 2)
                self.rss.append([at, round(sample.rss_bytes / 2**20, 1)])
            await asyncio.sleep(self.period)


class Progress:
    """Progress on stderr: a bar rewritten in place on a terminal, else a line per phase.

    A ``\\r`` bar written to a file or a pipe runs every update into one line, so when the
    stream is not a TTY each phase gets one line when it ends (or when the run stops).
    """

    def __init__(
        self,
        enabled: bool,
        *,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.enabled = enabled
        self.stream = sys.stderr if stream is None else stream
        self.tty = self.stream.isatty()
        self.clock = clock
        self.phase: str | None = None
        """The phase being shown, until the next one starts or :meth:`end`."""
        self.started = 0.0
        self.done = self.total = 0

    def show(self, phase: str, done: int, total: int) -> None:
        """Record how far ``phase`` is; a new phase ends the one before it."""
        if not self.enabled:
            return
        if phase != self.phase:
            self._finish()
            self.phase, self.started = phase, self.clock()
        self.done, self.total = done, total
        if self.tty:
            width = 30
            filled = width * done // max(1, total)
            bar = f"[{'#' * filled}{'.' * (width - filled)}]"
            self.stream.write(f"\r{phase:<8} {bar} {done}/{total}")
            self.stream.flush()

    def end(self) -> None:
        """End the last phase's line."""
        if self.enabled:
            self._finish()
            self.phase = None

    def _finish(self) -> None:
        if self.phase is None:
            return
        if self.tty:
            self.stream.write("\n")
        else:
            took = self.clock() - self.started
            self.stream.write(f"{self.phase}: {self.done}/{self.total} in {took:.1f} s\n")
        self.stream.flush()


async def _scrape(url: str) -> dict[str, float]:
    """Read the gateway's ``/metrics`` (unlabelled samples and labelled ones as written)."""
    parts = urlsplit(url)
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(parts.hostname, parts.port), 5
        )
    except (OSError, TimeoutError):
        return {}
    host = f"{parts.hostname}:{parts.port}"
    writer.write(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    except TimeoutError:
        return {}
    finally:
        writer.close()
    samples: dict[str, float] = {}
    for line in data.partition(b"\r\n\r\n")[2].decode().splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            try:
                samples[name] = float(value)
            except ValueError:
                pass
    return samples


async def _until(
    condition: Callable[[], bool], timeout: float, progress: Callable[[], None]
) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        progress()
        await asyncio.sleep(0.1)
    progress()
    return True


async def run_storm(args: argparse.Namespace) -> dict[str, Any]:
    """Run one storm as ``args`` say; return the result (see the module doc)."""
    host = check_loopback(args.url)
    raise_nofile_limit(4 * args.sessions + 1000)
    progress = Progress(not args.quiet)
    gateway: Gateway | None = None
    if args.gateway_cmd:
        gateway = Gateway(args.gateway_cmd, Path(args.gateway_log))
        gateway.start()
    elif args.mode != "drop":
        raise SystemExit("--mode kill and drain need --gateway-cmd (the tool restarts it)")
    monitor = Monitor(gateway, args.gateway_pid)
    sampler = asyncio.create_task(monitor.run())
    run_id = f"{int(time.time())}-{os.getpid()}"
    result: dict[str, Any] = {
        "tool": "hangon-storm",
        "version": 1,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "params": {
            "url": args.url,
            "sessions": args.sessions,
            "turns": args.turns,
            "mode": args.mode,
            "gateways": 1 if gateway else 0,
            "gateway_cmd": args.gateway_cmd,
            "connect_concurrency": args.connect_concurrency,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
    }
    sessions: list[Session] = []
    storm_started = [0.0]
    try:
        if args.baseline:
            from loadtest.baseline import measure_bare

            progress.show("baseline", 0, 1)
            result["baseline"] = await measure_bare(
                args.sessions, args.baseline_messages, rounds=args.baseline_rounds
            )
            progress.show("baseline", 1, 1)
        pid = monitor.current_pid()
        first = sample_process(pid) if pid else None
        rss_before = first.rss_bytes if first else 0
        for i in range(args.sessions):
            sessions.append(_session(args, i, run_id, host, storm_started))
        gate = asyncio.Semaphore(args.connect_concurrency)
        runners = [asyncio.create_task(_run_client(s, gate)) for s in sessions]
        monitor.note("connect")
        await _connect(args, sessions, result, progress)
        await asyncio.sleep(1.0)  # let RSS settle
        pid = monitor.current_pid()
        idle = sample_process(pid) if pid else None
        if idle is not None and rss_before:
            result["gateway_idle"] = {
                "rss_kib_per_session": round(
                    (idle.rss_bytes - rss_before) / 1024 / args.sessions, 2
                )
            }
        await _turns(args, sessions, result, progress, gateway, monitor)
        await _storm(args, sessions, result, progress, gateway, monitor, storm_started)
        await _verify(args, sessions, result, progress)
        for session in sessions:
            _settle(session.in_flight)
            await session.client.aclose()
        await asyncio.gather(*runners, return_exceptions=True)
    finally:
        progress.end()
        sampler.cancel()
        if gateway is not None and gateway.proc is not None and gateway.proc.poll() is None:
            result.setdefault("gateway", {})["cpu_s"] = round(gateway.cpu_seconds(), 2)
            gateway.stop(signal.SIGKILL)
    gw = result.setdefault("gateway", {})
    gw["peak_rss_mb"] = round(monitor.peak_rss / 2**20, 1)
    gw["rss_over_time"] = monitor.rss
    gw["events_s"] = monitor.events
    _ratios(result)
    violations = [{"session": s.name, "problem": p} for s in sessions for p in s.problems]
    result["violations"] = violations
    result["ok"] = (
        not violations
        and len(sessions) == args.sessions
        and result.get("verified") == args.sessions
    )
    return result


def _settle(future: asyncio.Future[int] | None) -> None:
    """Cancel or collect a turn nobody awaited (its session was never restored)."""
    if future is None:
        return
    if not future.done():
        future.cancel()
    elif not future.cancelled():
        future.exception()


def _session(
    args: argparse.Namespace, i: int, run_id: str, host: str, storm_started: list[float]
) -> Session:
    name = f"storm-{i}"
    holder: list[Session] = []

    def restored(r: Restored) -> None:
        if r.degraded:
            return  # the store was out; the real welcome follows
        s = holder[0]
        if storm_started[0] and s.after is None:
            s.after, s.restored_at = r, time.monotonic()
        if s.session_id is None:
            s.session_id = r.session_id

    def message(data: Any, seq: int) -> None:
        holder[0].seqs.append(seq)

    def reconnecting(code: int | None, delay: float) -> None:
        s = holder[0]
        if storm_started[0]:
            s.reconnects += 1
            if s.dropped_at is None:
                s.dropped_at = time.monotonic()
            if code == 1013:
                s.shed_hints += 1

    caller = {"user_id": name, "call_id": run_id}
    client = Client(
        args.url,
        caller,
        tenant=args.tenant,
        token=_token(args, caller),
        on_restored=restored,
        on_message=message,
        on_reconnecting=reconnecting,
        initial_delay=args.initial_delay,
        max_delay=args.max_delay,
        open_timeout=30,
        # Browsers and Twilio's media streams never ping; the gateway's own pings find a
        # dead client. Without them the clients are like the baseline's.
        heartbeat_interval=None,
        local_addr=source_address(i, host),
    )
    session = Session(name, client)
    holder.append(session)
    return session


def _token(args: argparse.Namespace, caller: dict[str, str]) -> str | None:
    """A signed token for ``caller`` (HS256, the key of ``--token-key``), or ``None``."""
    if args.token_key is None:
        return None
    kid, _, secret = args.token_key.partition(":")
    claims = {"tenant": args.tenant, "caller": caller, "exp": int(time.time()) + 3600}
    return jwt.encode(claims, base64.b64decode(secret), "HS256", headers={"kid": kid})


async def _run_client(session: Session, gate: asyncio.Semaphore) -> None:
    """Run the client; its first connection waits for one of the handshake places."""
    await gate.acquire()
    runner = asyncio.create_task(session.client.run())
    connected = asyncio.create_task(session.client.connected.wait())
    await asyncio.wait({runner, connected}, return_when=asyncio.FIRST_COMPLETED)
    connected.cancel()
    gate.release()
    try:
        await runner
    except ClientClosed as exc:
        if exc.code != 1000:
            session.problems.append(f"client stopped: {exc}")


async def _connect(
    args: argparse.Namespace, sessions: list[Session], result: dict[str, Any], progress: Progress
) -> None:
    started = time.monotonic()
    ok = await _until(
        lambda: all(s.client.connected.is_set() for s in sessions),
        args.timeout,
        lambda: progress.show(
            "connect", sum(s.client.connected.is_set() for s in sessions), len(sessions)
        ),
    )
    took = time.monotonic() - started
    if not ok:
        for s in sessions:
            if not s.client.connected.is_set():
                s.problems.append("never connected")
    result["connect"] = {"seconds": round(took, 3), "rate_per_s": round(len(sessions) / took, 1)}


async def _turns(
    args: argparse.Namespace,
    sessions: list[Session],
    result: dict[str, Any],
    progress: Progress,
    gateway: Gateway | None,
    monitor: Monitor,
) -> None:
    done = [0]
    before = await _scrape(args.url)
    pid = monitor.current_pid()
    sample = sample_process(pid) if pid else None
    cpu_before = sample.cpu_seconds if sample else None

    async def talk(s: Session) -> None:
        for k in range(args.turns):
            turn_id = f"t{k}"
            try:
                version = await asyncio.wait_for(
                    s.client.turn(turn_id, form={f"q{k}": k}), args.timeout
                )
            except (ClientClosed, TimeoutError) as exc:
                s.problems.append(f"turn {turn_id} not acknowledged: {exc!r}")
                return
            s.answers[f"q{k}"] = k
            s.versions[turn_id] = version
            done[0] += 1

    started = time.monotonic()
    task = asyncio.gather(*(talk(s) for s in sessions if s.client.connected.is_set()))
    total = args.turns * len(sessions)
    while not task.done():
        progress.show("turns", done[0], total)
        await asyncio.wait({task}, timeout=0.2)
    progress.show("turns", done[0], total)
    took = time.monotonic() - started
    after = await _scrape(args.url)
    sample = sample_process(pid) if pid else None
    cpu_after = sample.cpu_seconds if sample else None
    turns: dict[str, Any] = {
        "acked": done[0],
        "seconds": round(took, 3),
        "per_s": round(done[0] / took, 1),
    }
    if cpu_before is not None and cpu_after is not None and done[0]:
        turns["gateway_cpu_s"] = round(cpu_after - cpu_before, 3)
        turns["gateway_cpu_us_per_turn"] = round((cpu_after - cpu_before) / done[0] * 1e6, 1)
        turns["acked_per_gateway_cpu_s"] = round(done[0] / max(1e-9, cpu_after - cpu_before), 1)
    result["turns"] = turns
    trips = "hangon_store_round_trips_total"
    applied = 'hangon_session_turns_total{outcome="applied"}'
    if trips in after and applied in after and after[applied] > before.get(applied, 0):
        made = after[applied] - before.get(applied, 0)
        result["redis"] = {
            "round_trips_per_turn": round((after[trips] - before.get(trips, 0)) / made, 3)
        }


async def _storm(
    args: argparse.Namespace,
    sessions: list[Session],
    result: dict[str, Any],
    progress: Progress,
    gateway: Gateway | None,
    monitor: Monitor,
    storm_started: list[float],
) -> None:
    alive = [s for s in sessions if s.client.connected.is_set()]
    for s in sessions:
        if not s.client.connected.is_set():
            s.problems.append("not connected when the storm began")
    before = await _scrape(args.url) if args.mode == "drop" else {}
    progress.show("storm", 0, len(alive))
    started = time.monotonic()
    storm_started[0] = started
    monitor.note("storm")
    cpu_before = gateway.cpu_seconds() if gateway else None
    restarted: float | None = None
    for s in alive:
        s.in_flight = asyncio.ensure_future(s.client.turn(_IN_FLIGHT, form={_IN_FLIGHT: 1}))
    await asyncio.sleep(0)  # the turns are on the wire, or about to be, when the storm strikes
    if args.mode == "drop":
        for s in alive:
            s.dropped_at = started
            s.client.abort()
    else:
        assert gateway is not None
        # In threads: the clients must keep running (and see the drain) meanwhile.
        await asyncio.to_thread(
            gateway.stop, signal.SIGKILL if args.mode == "kill" else signal.SIGTERM
        )
        monitor.note("stopped")
        await asyncio.to_thread(gateway.start)
        restarted = time.monotonic() - started
        monitor.note("restarted")
        if cpu_before is not None:
            # The new process's start-up (imports, mostly) is not the restores' cost.
            cpu_before += gateway.cpu_seconds() - gateway.cpu_before_restarts
    ok = await _until(
        lambda: all(s.after is not None for s in alive),
        args.timeout,
        lambda: progress.show("storm", sum(s.after is not None for s in alive), len(alive)),
    )
    took = time.monotonic() - started
    if not ok:
        for s in alive:
            if s.after is None:
                s.problems.append(f"not restored within {args.timeout} s")
    latencies = [
        (s.restored_at - (s.dropped_at or started)) * 1000
        for s in alive
        if s.restored_at is not None
    ]
    timeline = sorted(s.restored_at - started for s in alive if s.restored_at is not None)
    step = max(1, len(timeline) // 400)
    after = await _scrape(args.url)
    shed = sum(v for k, v in after.items() if k.startswith("hangon_admission_shed_total"))
    shed -= sum(v for k, v in before.items() if k.startswith("hangon_admission_shed_total"))
    storm: dict[str, Any] = {
        "all_restored_s": round(took, 3),
        "restored": len(latencies),
        "shed": int(shed),
        "retried": sum(max(0, s.reconnects - 1) for s in alive),
        "reconnects": sum(s.reconnects for s in alive),
    }
    if restarted is not None:
        # From the signal until the new process listens: all_restored_s includes it.
        storm["gateway_restart_s"] = round(restarted, 3)
    if gateway is not None and cpu_before is not None:
        cpu = gateway.cpu_seconds() - cpu_before
        storm["gateway_cpu_s"] = round(cpu, 3)
        result.setdefault("gateway", {})["cpu_ms_per_restore"] = round(
            cpu / max(1, len(alive)) * 1000, 3
        )
    result["storm"] = storm
    if ok:
        monitor.events["all_restored"] = round(started + took - monitor.started, 2)
    result["restore_latency_ms"] = {**_percentiles(latencies), "samples": latencies}
    result["restored_over_time"] = [
        [round(t, 3), n + 1]
        for n, t in enumerate(timeline)
        if n % step == 0 or n == len(timeline) - 1
    ]


async def _verify(
    args: argparse.Namespace, sessions: list[Session], result: dict[str, Any], progress: Progress
) -> None:
    checked = [0]

    async def check(s: Session) -> None:
        if s.after is None:
            return  # already reported: not restored, or not connected before the storm
        try:
            await verify(s)
        except Exception as exc:  # a malformed welcome must fail its session, not pass it
            s.problems.append(f"verification failed: {exc!r}")
        checked[0] += 1

    async def verify(s: Session) -> None:
        r = s.after
        if r is None:
            return
        if r.session_id != s.session_id:
            s.problems.append(f"restored session {r.session_id}, had {s.session_id}")
        if not r.resumed:
            s.problems.append("welcome after the storm says resumed: false")
        answers = r.state.get("form_answers", {})
        if any(answers.get(k) != v for k, v in s.answers.items()):
            s.problems.append(f"restored answers {answers}, acknowledged {s.answers}")
        acked = max(s.versions.values()) if s.versions else 0
        # The in-flight turn may have landed before the loss (the welcome has it) or not.
        # Without an agent (no message seen) only turns move the version: it must be exact.
        # An agent's patches may move it further.
        allowed = {acked, acked + 1} if s.in_flight is not None else {acked}
        if r.version < acked or (not s.seqs and r.version not in allowed):
            s.problems.append(f"restored version {r.version}, acked {acked}")
        if s.in_flight is not None:
            try:
                landed = await asyncio.wait_for(s.in_flight, args.timeout)
            except (ClientClosed, TimeoutError) as exc:
                s.problems.append(f"in-flight turn not acknowledged: {exc!r}")
            else:
                if not s.seqs and landed != acked + 1:
                    s.problems.append(f"in-flight turn acked at version {landed}, not {acked + 1}")
                s.versions[_IN_FLIGHT] = landed
        if s.versions:
            last = _IN_FLIGHT if _IN_FLIGHT in s.versions else f"t{args.turns - 1}"
            form = {_IN_FLIGHT: 1} if last == _IN_FLIGHT else {f"q{args.turns - 1}": args.turns - 1}
            try:
                again = await asyncio.wait_for(s.client.turn(last, form=form), args.timeout)
            except (ClientClosed, TimeoutError) as exc:
                s.problems.append(f"re-sent turn not acknowledged: {exc!r}")
            else:
                if again != s.versions.get(last):
                    s.problems.append(
                        f"re-sent turn {last} acked at version {again}, first at {s.versions[last]}"
                    )
        if s.seqs and s.seqs != list(range(1, len(s.seqs) + 1)):
            s.problems.append(f"agent messages missing, repeated or out of order: {s.seqs[:20]}")

    task = asyncio.gather(*(check(s) for s in sessions))
    while not task.done():
        progress.show("verify", checked[0], len(sessions))
        await asyncio.wait({task}, timeout=0.2)
    progress.show("verify", checked[0], len(sessions))
    result["verified"] = checked[0]


def _ratios(result: dict[str, Any]) -> None:
    base = result.get("baseline")
    if not base:
        return
    ratios: dict[str, float] = {}

    def ratio(name: str, hangon: float | None, bare: float | None) -> None:
        if hangon and bare:
            ratios[name] = round(hangon / bare, 2)

    bare_connect = base.get("connect", {})
    # The same drop and reconnect against the bare server: like for like, the old
    # connections' teardown included.
    bare_storm = bare_connect.get("drop_storm", {})
    restore_cpu = result.get("gateway", {}).get("cpu_ms_per_restore")
    restored_s = result.get("storm", {}).get("all_restored_s")
    ratio("cpu_per_restore_vs_bare", restore_cpu, bare_connect.get("server_cpu_ms_per_connection"))
    ratio("restore_time_vs_bare_connect", restored_s, bare_connect.get("seconds"))
    ratio(
        "cpu_per_restore_vs_bare_storm",
        restore_cpu,
        bare_storm.get("server_cpu_ms_per_reconnect"),
    )
    ratio("restore_time_vs_bare_storm", restored_s, bare_storm.get("seconds"))
    ratio(
        "rss_per_session_vs_bare",
        result.get("gateway_idle", {}).get("rss_kib_per_session"),
        bare_connect.get("server_rss_kib_per_connection"),
    )
    ratio(
        "cpu_per_turn_vs_bare_echo",
        result.get("turns", {}).get("gateway_cpu_us_per_turn"),
        base.get("echo", {}).get("server_cpu_us_per_message"),
    )
    result["ratios"] = ratios


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest storm",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--url", required=True, help="the gateway's WebSocket URL (loopback only)")
    p.add_argument("--sessions", type=int, default=1000)
    p.add_argument("--turns", type=int, default=5)
    p.add_argument("--mode", choices=("drop", "kill", "drain"), default="drop")
    p.add_argument("--gateway-cmd", help="start the gateway with this command (kill, drain)")
    p.add_argument("--gateway-log", default="storm-gateway.log")
    p.add_argument("--gateway-pid", type=int, help="an external gateway's PID, for RSS and CPU")
    p.add_argument("--connect-concurrency", type=int, default=500)
    p.add_argument("--initial-delay", type=float, default=0.5, help="client backoff, seconds")
    p.add_argument("--max-delay", type=float, default=30.0)
    p.add_argument("--timeout", type=float, default=120.0, help="bound on every phase, seconds")
    p.add_argument("--baseline", action="store_true", help="measure a bare websockets server too")
    p.add_argument("--baseline-messages", type=int, default=50_000)
    p.add_argument(
        "--baseline-rounds",
        type=int,
        default=3,
        help="bare drop storms and echo runs; the ratios use their median",
    )
    p.add_argument("--json", help="write the result here")
    p.add_argument("--html", help="write the HTML report here")
    p.add_argument(
        "--quiet",
        action="store_true",
        help="no progress (on a terminal a bar, else one line per phase)",
    )
    p.add_argument("--tenant", default=None, help="the sessions' tenant (default: none)")
    p.add_argument(
        "--token-key",
        default=None,
        metavar="KID:BASE64",
        help="sign each session an HS256 token with this key of --tenant, for a gateway with"
        " --auth-keys (a key of that tenant with this kid and secret)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    check_loopback(args.url)
    tune_gc()
    try:
        import uvloop

        result = uvloop.run(run_storm(args))
    except ImportError:
        result = asyncio.run(run_storm(args))
    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(text)
    if args.html:
        from loadtest.report import write_report

        write_report(result, Path(args.html))
    summary = {k: v for k, v in result.items() if k not in ("restored_over_time",)}
    summary["restore_latency_ms"] = {
        k: v for k, v in result.get("restore_latency_ms", {}).items() if k != "samples"
    }
    summary["gateway"] = {
        k: v for k, v in result.get("gateway", {}).items() if k != "rss_over_time"
    }
    summary["violations"] = result["violations"][:20]
    print(json.dumps(summary, indent=2))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
