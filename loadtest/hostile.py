"""Re-run the three attacks of issue 16 against a gateway process, and measure what each costs.

Starts ``hangon serve`` itself (the demo agent in-process, the Redis store at
``--redis-url`` under a key prefix of its own, which it deletes afterwards), keeps a
bystander session open beside the attacks, and runs:

1. ``non-reader``: a raw client with a 4 KB receive buffer resumes a session whose state
   is about 180 KB, stops reading, and sends 19 turns a second; the demo agent answers
   each with a state change, so the gateway has a 180 KB ``state`` frame per turn for
   it. Measures the gateway's RSS growth, how long until it cut the client, and RSS
   once the client is gone.
2. ``twilio-deep``: Twilio ``start`` frames whose pass-through fields nest 300 deep.
   Each must close 1007 with no agent link left behind and no key added to Redis.
3. ``last-seq``: a ``hello`` with ``last_seq`` 2^62 beside the caller's live
   connection. Redis must be byte for byte unchanged, and the live connection's
   next turn must be acknowledged.

Then the bystander's next turn must land on the version it last saw, and the gateway's
log must hold no traceback. Prints a JSON report; exit code 1 if any check failed::

    python -m loadtest.hostile --redis-url redis://127.0.0.1:6379/0

Loopback targets only.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from loadtest.net import check_loopback, sample_process

__all__ = ["main", "run"]

MIB = 1 << 20
SECRET = "Bystander-Secret-4155550123"
ANSWERS = ["Ada", "Friday", "a checkup", "no"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Gateway:
    """``hangon serve`` in a process of its own, its log in a file."""

    def __init__(self, redis_url: str, prefix: str, extra: list[str], log: Path) -> None:
        self.port = free_port()
        self.prefix = prefix
        self.log = log
        env = dict(os.environ)
        env.setdefault("HANGON_STATE_KEYS", "k1:" + base64.b64encode(os.urandom(32)).decode())
        env.setdefault("HANGON_CALLER_HASH_KEY", base64.b64encode(os.urandom(32)).decode())
        command = [sys.executable, "-m", "gateway", "serve", "--port", str(self.port)]
        command += ["--redis-url", redis_url, "--key-prefix", prefix, *extra]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)

    async def ready(self) -> None:
        for _ in range(300):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise SystemExit(f"the gateway did not start; see {self.log}")

    def rss(self) -> int:
        sample = sample_process(self.proc.pid)
        return sample.rss_bytes if sample else 0

    def url(self, path: str = "/ws") -> str:
        return f"ws://127.0.0.1:{self.port}{path}"

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def hello(ws: Any, caller: dict[str, str], **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps({"type": "hello", "caller": caller, **fields}))
    welcome: dict[str, Any] = json.loads(await ws.recv())
    return welcome


async def turn(ws: Any, turn_id: str, **fields: Any) -> dict[str, Any]:
    """Send a turn; return its ack, skipping what the agent says meanwhile."""
    await ws.send(json.dumps({"type": "turn", "turn_id": turn_id, **fields}))
    while True:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if frame["type"] in ("ack", "error", "nack"):
            return frame


async def quiet(ws: Any) -> int:
    """Read until nothing comes for 0.5 s; return the newest state version seen."""
    version = 0
    try:
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 0.5))
            version = max(version, frame.get("version", 0))
    except TimeoutError:
        return version


async def non_reader(gw: Gateway, *, seconds: float) -> dict[str, Any]:
    """Attack 1: a client that stops reading while 180 KB states pile up for it."""
    caller = {"user_id": "non-reader", "call_id": secrets.token_hex(4)}
    async with connect(gw.url(), max_size=None) as ws:
        welcome = await hello(ws, caller)
        for i in range(4):  # four 45 KB answers: a state of about 180 KB
            ack = await turn(ws, f"big{i}", form={f"note{i}": "n" * 45_000})
            assert ack["type"] == "ack", ack
        await quiet(ws)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{gw.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    await reader.readuntil(b"\r\n\r\n")

    def send(message: dict[str, Any]) -> None:
        payload = json.dumps(message).encode()
        mask = os.urandom(4)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        size = len(payload)
        head = bytes([0x81, 0x80 | 126]) + size.to_bytes(2, "big") if size >= 126 else None
        head = head or bytes([0x81, 0x80 | size])
        writer.write(head + mask + masked)

    send({"type": "hello", "caller": caller, "resume_token": welcome["resume_token"]})
    writer.transport.pause_reading()  # and never reads again
    before = gw.rss()
    peak = before
    loop = asyncio.get_running_loop()
    started = loop.time()
    cut_after = None
    i = 0
    while loop.time() - started < seconds:
        if writer.transport.is_closing():
            cut_after = loop.time() - started
            break
        try:
            # Name, date, reason, then "no" at the confirmation: the demo agent answers each
            # with a state change, and the "no" starts the form over.
            text = ANSWERS[i % len(ANSWERS)]
            send({"type": "turn", "turn_id": f"t{i}", "text": text})
        except (ConnectionError, RuntimeError):
            cut_after = loop.time() - started
            break
        i += 1
        await asyncio.sleep(1 / 19)
        peak = max(peak, gw.rss())
    writer.transport.abort()
    await asyncio.sleep(5)
    # The agent, held back while the client was, must not be blamed for it.
    cut = await metric(gw, 'hangon_agent_links_cut_total{reason="slow_consumer"}')
    return {
        "agent_links_cut": cut,
        "turns_sent": i,
        "cut_after_s": None if cut_after is None else round(cut_after, 1),
        "rss_before_mib": round(before / MIB, 1),
        "rss_peak_growth_mib": round((peak - before) / MIB, 1),
        "rss_after_mib": round(gw.rss() / MIB, 1),
        "ok": cut_after is not None and cut_after < 60 and peak - before < 50 * MIB and cut == 0,
    }


async def metric(gw: Gateway, sample: str) -> float:
    """One sample of the gateway's /metrics, as written there (name and labels)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    body = (await reader.read()).decode()
    writer.close()
    found = re.search(rf"^{re.escape(sample)} (\S+)$", body, re.M)
    return float(found.group(1)) if found else -1.0


async def agent_links(gw: Gateway) -> float:
    return await metric(gw, "hangon_agent_links_active")


async def twilio_deep(gw: Gateway, client: aioredis.Redis, *, streams: int = 20) -> dict[str, Any]:
    """Attack 2: Twilio starts whose pass-through fields nest 300 deep."""
    links = await agent_links(gw)
    # Keys, not their contents: the sessions of the other attacks may still be written to
    # (the non-reader's agent output, stored after its cut), but no stream may add one.
    before = set(await snapshot(client, gw.prefix))
    deep = json.loads("[" * 300 + "]" * 300)
    codes = []
    for n in range(streams):
        body = {
            "callSid": f"CA{n:032d}",
            "streamSid": f"MZ{n:032d}",
            "accountSid": "AC" + "0" * 32,
            "customParameters": {"From": "+14155550100", "deep": deep},
            "tracks": deep,
            "mediaFormat": {"encoding": deep},
        }
        async with connect(gw.url("/v1/twilio")) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call"}))
            await ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "start": body}))
            try:
                await asyncio.wait_for(ws.recv(), 5)
            except ConnectionClosed:
                pass
            codes.append(ws.close_code)
    await asyncio.sleep(1)
    after = await agent_links(gw)
    unchanged = set(await snapshot(client, gw.prefix)) == before
    return {
        "streams": streams,
        "close_codes": sorted(set(codes), key=str),
        "agent_links_before": links,
        "agent_links_after": after,
        "no_keys_added": unchanged,
        "ok": set(codes) == {1007} and after == links and unchanged,
    }


async def snapshot(client: aioredis.Redis, prefix: str) -> dict[bytes, bytes | None]:
    keys = sorted([key async for key in client.scan_iter(match=prefix + "*", count=1000)])
    return {key: await client.dump(key) for key in keys}


async def last_seq(gw: Gateway, client: aioredis.Redis) -> dict[str, Any]:
    """Attack 3: a hello with last_seq 2^62 beside the caller's live connection."""
    caller = {"phone": "+14155550123", "call_id": secrets.token_hex(4)}
    async with connect(gw.url()) as live:
        welcome = await hello(live, caller)
        await turn(live, "l1", text="Ada")
        # The demo agent answers with a state change, then a message: both stored before
        # the snapshot, however slow the machine.
        version = 0
        while True:
            frame = json.loads(await asyncio.wait_for(live.recv(), 10))
            if frame["type"] == "state":
                version = frame["version"]
            elif frame["type"] == "msg" and version:
                break
        before = await snapshot(client, gw.prefix)
        async with connect(gw.url()) as bad:
            await bad.send(
                json.dumps(
                    {
                        "type": "hello",
                        "caller": caller,
                        "resume_token": welcome["resume_token"],
                        "last_seq": 2**62,
                    }
                )
            )
            error = json.loads(await asyncio.wait_for(bad.recv(), 5))
            try:
                await asyncio.wait_for(bad.recv(), 5)
            except ConnectionClosed:
                pass
            code = bad.close_code
        unchanged = await snapshot(client, gw.prefix) == before
        after = await turn(live, "l2", text="Friday")
    return {
        "error": error.get("code"),
        "close_code": code,
        "redis_unchanged": unchanged,
        "live_turn": after["type"],
        "ok": error.get("code") == "invalid_message"
        and code == 1007
        and unchanged
        and after == {"type": "ack", "turn_id": "l2", "version": version + 1},
    }


async def run(redis_url: str, *, seconds: float, extra: list[str], log: Path) -> dict[str, Any]:
    """Run the three attacks beside a bystander; return the report."""
    check_loopback(redis_url)
    prefix = f"hostile-{secrets.token_hex(4)}:"
    gw = Gateway(redis_url, prefix, extra, log)
    client = aioredis.Redis.from_url(redis_url)
    report: dict[str, Any] = {}
    try:
        await gw.ready()
        bystander_caller = {"user_id": "bystander", "call_id": secrets.token_hex(4)}
        async with connect(gw.url()) as bystander:
            await hello(bystander, bystander_caller)
            first = await turn(bystander, "b1", form={"secret": SECRET})
            assert first["type"] == "ack", first
            seen = max(first["version"], await quiet(bystander))
            report["non_reader"] = await non_reader(gw, seconds=seconds)
            report["twilio_deep"] = await twilio_deep(gw, client)
            report["last_seq"] = await last_seq(gw, client)
            seen = max(seen, await quiet(bystander))
            ack = await turn(bystander, "b2", form={"after": True})
            report["bystander"] = {"ok": ack.get("version") == seen + 1, "ack": ack}
        report["rss_end_mib"] = round(gw.rss() / MIB, 1)
    finally:
        gw.stop()
        keys = [key async for key in client.scan_iter(match=prefix + "*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
    text = log.read_text(errors="replace")
    report["log"] = {
        "ok": "Traceback" not in text and "never retrieved" not in text,
        "lines": text.count("\n"),
    }
    report["ok"] = all(part["ok"] for part in report.values() if isinstance(part, dict))
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.hostile", description=__doc__)
    parser.add_argument("--redis-url", required=True, help="a Redis on loopback to use")
    parser.add_argument(
        "--seconds", type=float, default=90.0, help="how long the non-reader may last (90)"
    )
    parser.add_argument("--log", type=Path, default=None, help="where the gateway logs")
    parser.add_argument("gateway_args", nargs="*", help="more `hangon serve` options, after --")
    args = parser.parse_args(argv)
    log = args.log or Path(tempfile.mkdtemp(prefix="hangon-hostile-")) / "gateway.log"
    started = time.monotonic()
    report = asyncio.run(
        run(args.redis_url, seconds=args.seconds, extra=args.gateway_args, log=log)
    )
    report["seconds"] = round(time.monotonic() - started, 1)
    report["gateway_log"] = str(log)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
