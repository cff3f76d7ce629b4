"""Phone audio at real-time pace: hangon's Twilio path beside a bare websockets relay.

``--calls`` Twilio-format streams each send one 20 ms μ-law frame every 20 ms for
``--seconds``, as a phone does, to a relay that passes each frame to an echo agent and the
agent's answer back. Each frame's payload carries its call and number, so the driver
times every round trip. The relay process's CPU is counted over the streaming window and
divided by the frames it relayed, both directions: CPU per frame, and the calls one core
would carry at that cost. Two relays, one after the other, with the same agent and driver:

- **hangon**: ``hangon serve`` (``--gateway-cmd``, Redis or the memory store), its
  ``/v1/twilio`` endpoint, and the agent as its ``--downstream``;
- **bare**: :func:`loadtest.bare.serve_relay`, the floor a Python relay on websockets
  costs: one agent connection per call, each frame parsed and re-encoded for the other
  side, nothing else.

The echo agent (``--serve agent``) and the bare relay (``--serve relay``) run as processes
of their own, so that only the relay under test is on the clock. Loopback targets only.

    python -m loadtest audio --calls 50 --seconds 10 --json audio.json --html audio.html
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shlex
import signal
import struct
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from loadtest.bare import serve_agent, serve_relay
from loadtest.net import check_loopback, sample_process
from loadtest.storm import _LISTENING, Gateway, _percentiles

__all__ = ["main"]

FRAME_S = 0.02
"""20 ms of 8 kHz μ-law per media frame: 160 bytes, as Twilio sends them."""
_TAG = struct.Struct("!II")
"""A frame's call index and number, at the start of its payload."""


class Call:
    """One phone call: a stream that sends a frame every 20 ms and times each echo."""

    def __init__(self, index: int, ws: ClientConnection) -> None:
        self.index = index
        self.ws = ws
        self.stream_sid = f"MZ{index:032x}"
        self.sent: dict[int, float] = {}
        self.rtt_ms: list[float] = []
        self.reader = asyncio.create_task(self._read())

    async def start(self) -> None:
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
        start = {
            "streamSid": self.stream_sid,
            "callSid": f"CA{self.index:032x}",
            "accountSid": "AC" + "0" * 32,
            "tracks": ["inbound"],
            "customParameters": {"From": f"+1415555{self.index:04d}"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1},
        }
        await self.ws.send(json.dumps({"event": "start", "start": start}))

    async def send(self, number: int) -> None:
        payload = _TAG.pack(self.index, number) + bytes(152)
        frame = {
            "event": "media",
            "streamSid": self.stream_sid,
            "media": {
                "track": "inbound",
                "chunk": str(number),
                "timestamp": str(number * 20),
                "payload": base64.b64encode(payload).decode(),
            },
        }
        self.sent[number] = time.perf_counter()
        await self.ws.send(orjson.dumps(frame).decode())

    async def _read(self) -> None:
        try:
            async for raw in self.ws:
                event = orjson.loads(raw)
                if event.get("event") != "media":
                    continue
                index, number = _TAG.unpack_from(base64.b64decode(event["media"]["payload"]))
                sent = self.sent.pop(number, None) if index == self.index else None
                if sent is not None:
                    self.rtt_ms.append((time.perf_counter() - sent) * 1000)
        except ConnectionClosed:
            pass


async def _stream(call: Call, frames: int, started: float) -> None:
    """Send ``frames`` frames on the 20 ms grid from ``started`` (no drift, no bursts)."""
    for n in range(frames):
        delay = started + n * FRAME_S - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        await call.send(n)


async def drive(url: str, calls: int, seconds: float, relay_pid: int) -> dict[str, Any]:
    """Stream ``calls`` calls for ``seconds`` after a 1 s warm-up; report the relay's cost."""
    opened = [Call(i, await connect(url, compression=None, max_size=None)) for i in range(calls)]
    for call in opened:
        await call.start()
    await asyncio.sleep(1.0)  # links dialled, sessions restored: not on the clock
    warm = int(1.0 / FRAME_S)
    frames = warm + int(seconds / FRAME_S)
    offsets = [i * FRAME_S / calls for i in range(calls)]  # phones do not tick together
    base = time.perf_counter() + 0.05
    streams = [
        asyncio.create_task(_stream(c, frames, base + offset))
        for c, offset in zip(opened, offsets, strict=True)
    ]
    await asyncio.sleep(max(0.0, base + warm * FRAME_S - time.perf_counter()))
    counted = sum(len(c.rtt_ms) for c in opened)
    before = sample_process(relay_pid)
    await asyncio.gather(*streams)
    await asyncio.sleep(0.5)  # the last echoes
    after = sample_process(relay_pid)
    echoed = sum(len(c.rtt_ms) for c in opened) - counted
    latencies = sorted(ms for c in opened for ms in c.rtt_ms[warm:])
    lost = sum(len(c.sent) for c in opened)
    for call in opened:
        await call.ws.close()
        call.reader.cancel()
    if before is None or after is None:
        raise SystemExit("the relay process exited during the run")
    cpu = after.cpu_seconds - before.cpu_seconds
    relayed = 2 * echoed  # each echoed frame crossed the relay twice
    return {
        "calls": calls,
        "seconds": seconds,
        "frames_sent": calls * frames,
        "frames_echoed_measured": echoed,
        "frames_lost": lost,
        "relay_cpu_s": round(cpu, 3),
        "cpu_us_per_frame": round(cpu / relayed * 1e6, 2) if relayed else None,
        "calls_per_core": round(calls * seconds / cpu, 1) if cpu else None,
        "rss_mib": round(after.rss_bytes / 2**20, 1),
        "rtt_ms": _percentiles(latencies),
        "rtt_samples_ms": [round(v, 3) for v in latencies[:: max(1, len(latencies) // 2000)]],
    }


# Running both


def _process(args: list[str], log: Path) -> Gateway:
    proc = Gateway(shlex.join(args), log)
    try:
        proc.start()
    except BaseException:
        if proc.proc is not None:  # it did not say it listens: do not leave it running
            proc.proc.kill()
            proc.proc.wait()
        raise
    return proc


def _stop(proc: Gateway) -> None:
    if proc.proc is not None and proc.proc.poll() is None:
        proc.stop(signal.SIGTERM, timeout=20)


def _port_of(log: Path) -> int:
    found = _LISTENING.findall(log.read_bytes())
    return int(found[-1])


async def _measure(
    command: list[str], path: str, log: Path, args: argparse.Namespace
) -> dict[str, Any]:
    """Start one relay, stream the calls through it, stop it."""
    relay = _process(command, log)
    try:
        assert relay.pid is not None
        url = f"ws://127.0.0.1:{_port_of(log)}{path}"
        return await drive(url, args.calls, args.seconds, relay.pid)
    finally:
        _stop(relay)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="hangon-audio-"))
    me = [sys.executable, "-m", "loadtest.audio"]
    agent = _process([*me, "--serve", "agent", "--port", "0"], work / "agent.log")
    agent_url = f"ws://127.0.0.1:{_port_of(work / 'agent.log')}/"
    result: dict[str, Any] = {"tool": "hangon-audio", "calls": args.calls, "logs": str(work)}
    try:
        command = args.gateway_cmd or f"{sys.executable} -m gateway serve --port 0"
        hangon = [*shlex.split(command), "--downstream", agent_url]
        bare = [*me, "--serve", "relay", "--port", "0", "--agent", agent_url]
        for name, relay, path in (("hangon", hangon, "/v1/twilio"), ("bare", bare, "/")):
            result[name] = await _measure(relay, path, work / f"{name}.log", args)
    finally:
        _stop(agent)
    h, b = result["hangon"], result["bare"]
    if h["cpu_us_per_frame"] and b["cpu_us_per_frame"]:
        result["cpu_per_frame_ratio"] = round(h["cpu_us_per_frame"] / b["cpu_us_per_frame"], 2)
    if h["rtt_ms"] and b["rtt_ms"]:
        result["p99_rtt_ratio"] = round(h["rtt_ms"]["p99"] / b["rtt_ms"]["p99"], 2)
    return result


def html(result: dict[str, Any]) -> str:
    """A page with the two relays' figures and their round-trip histograms."""
    from loadtest.plot import latency_plot

    rows = []
    for name in ("hangon", "bare"):
        r = result[name]
        rows.append(
            f"<tr><th>{name}</th><td>{r['cpu_us_per_frame']} µs</td><td>{r['calls_per_core']}</td>"
            f"<td>{r['rtt_ms'].get('p50')} ms</td><td>{r['rtt_ms'].get('p99')} ms</td>"
            f"<td>{r['frames_lost']}</td></tr>"
        )
    plots = "".join(
        latency_plot(
            {"samples": result[name]["rtt_samples_ms"], **result[name]["rtt_ms"]},
            title=f"Audio round trip, {name}",
            axis="round trip, caller to echo agent and back (ms)",
        )
        for name in ("hangon", "bare")
    )
    return (
        "<!doctype html><meta charset=utf-8><title>hangon audio relay</title>"
        "<style>body{font:15px system-ui;max-width:60rem;margin:2rem auto}"
        "td,th{padding:.2rem .8rem;text-align:right}</style>"
        f"<h1>Phone audio at real-time pace: {result['calls']} calls</h1>"
        f"<p>CPU per relayed frame, hangon ÷ bare: <b>{result.get('cpu_per_frame_ratio')}×</b>; "
        f"p99 round trip, hangon ÷ bare: <b>{result.get('p99_rtt_ratio')}×</b>.</p>"
        "<table><tr><th></th><th>CPU per frame</th><th>calls per core</th><th>p50</th>"
        f"<th>p99</th><th>frames lost</th></tr>{''.join(rows)}</table>{plots}"
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m loadtest audio", description=__doc__)
    parser.add_argument("--calls", type=int, default=50, help="concurrent calls (default: 50)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per relay")
    parser.add_argument(
        "--gateway-cmd",
        help="how to start hangon, without --downstream (default: python -m gateway serve "
        "--port 0, on the memory store); must listen on loopback",
    )
    parser.add_argument("--json", type=Path, help="write the result here")
    parser.add_argument("--html", type=Path, help="write a report with the histograms here")
    parser.add_argument("--serve", choices=("agent", "relay"), help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--agent", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    if args.serve == "agent":
        uvloop.run(serve_agent(args.port))
    elif args.serve == "relay":
        check_loopback(args.agent)
        uvloop.run(serve_relay(args.port, args.agent))
    result = uvloop.run(run(args))
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text)
    if args.html:
        args.html.write_text(html(result))
    for name in ("hangon", "bare"):
        result[name].pop("rtt_samples_ms")  # in the files, not on the terminal
    print(json.dumps(result, indent=2))
    return 0 if result["hangon"]["frames_lost"] == 0 else 1


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    sys.exit(main())
