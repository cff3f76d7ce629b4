"""Reconnect storm: many sessions talk, drop at the same instant, come back, and must find
exactly the state they were acknowledged.

Every session says hello, sends ``--turns`` turns and waits for each ack; then all
sessions drop their connections at once (the TCP connection is aborted, no close
frame: a network blip or a killed node), reconnect at once with their resume tokens
and check that the welcome holds every acknowledged turn and nothing else. This
repeats ``--drops`` times; then each session re-sends its last turn (an ack lost in
the drop) and says bye. The exit code is 1 if any session lost or doubled anything.

Only loopback addresses are accepted as targets.

    python -m loadtest.reconnect --url ws://127.0.0.1:8765/ws --sessions 1000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from loadtest.net import check_loopback


@dataclass
class Stats:
    hello_ms: list[float] = field(default_factory=list)
    resume_ms: list[float] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    turns: int = 0
    messages: int = 0
    """Agent messages received (each exactly once, in order, or it is a mismatch)."""
    mismatches: list[str] = field(default_factory=list)


class Rendezvous:
    """All live sessions meet here; a session that failed withdraws so nobody waits for it."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.arrived = 0
        self.event = asyncio.Event()

    def _check(self) -> None:
        if self.arrived >= self.expected:
            self.event.set()

    async def wait(self) -> None:
        self.arrived += 1
        self._check()
        await self.event.wait()

    def withdraw(self) -> None:
        self.expected -= 1
        self._check()


class Inbox:
    """One caller's view of the agent's messages: ``last_seq`` across connections."""

    def __init__(self, name: str, stats: Stats) -> None:
        self.name = name
        self.stats = stats
        self.last_seq = 0

    async def request(
        self, ws: ClientConnection, message: dict[str, Any]
    ) -> tuple[dict[str, Any], float]:
        """Send ``message``; return the gateway's answer, checking agent messages on the way."""
        start = time.perf_counter()
        await ws.send(json.dumps(message))
        while True:
            reply: dict[str, Any] = json.loads(await ws.recv())
            kind = reply.get("type")
            if kind == "msg":
                if reply["seq"] != self.last_seq + 1:
                    self.stats.mismatches.append(
                        f"{self.name}: message {reply['seq']} after {self.last_seq}"
                    )
                self.last_seq = reply["seq"]
                self.stats.messages += 1
                await ws.send(json.dumps({"type": "ack", "seq": self.last_seq}))
            elif kind != "state":
                return reply, (time.perf_counter() - start) * 1000

    def welcomed(self, welcome: dict[str, Any], resumed: bool) -> None:
        if not resumed:
            self.last_seq = 0
        elif welcome.get("replay") == "partial":
            self.stats.mismatches.append(f"{self.name}: replay partial from {welcome}")
            self.last_seq = welcome["replay_from"] - 1


async def session(i: int, args: argparse.Namespace, stats: Stats, meets: list[Rendezvous]) -> None:
    """One caller; withdraws from every meeting it will not reach."""
    pending = list(meets)
    try:
        await converse(i, args, stats, pending)
    finally:
        for meet in pending:
            meet.withdraw()


async def converse(
    i: int, args: argparse.Namespace, stats: Stats, pending: list[Rendezvous]
) -> None:
    caller = {"phone": f"+1415555{i % 10000:04d}", "call_id": f"{args.run}-{i}"}
    expected: dict[str, Any] = {}
    version = 0
    token = None
    resumed = False
    inbox = Inbox(f"session {i}", stats)
    request = inbox.request
    for round_ in range(args.drops + 1):
        ws = await connect(args.url, open_timeout=60)
        hello = {"type": "hello", "caller": caller, "resume_token": token}
        hello["last_seq"] = inbox.last_seq
        welcome, ms = await request(ws, {k: v for k, v in hello.items() if v is not None})
        (stats.resume_ms if resumed else stats.hello_ms).append(ms)
        if welcome.get("type") != "welcome":
            stats.mismatches.append(f"session {i}: {welcome}")
            return
        inbox.welcomed(welcome, resumed)
        got = (welcome["version"], welcome["state"]["form_answers"])
        if got != (version, expected):
            stats.mismatches.append(f"session {i} round {round_}: {got} != {(version, expected)}")
        token = welcome["resume_token"]
        for n in range(args.turns):
            form = {f"r{round_}f{n}": f"{i}-{round_}-{n}"}
            ack, ms = await request(ws, {"type": "turn", "turn_id": f"{round_}-{n}", "form": form})
            stats.ack_ms.append(ms)
            if ack != {"type": "ack", "turn_id": f"{round_}-{n}", "version": version + 1}:
                stats.mismatches.append(f"session {i}: unexpected {ack}")
                return
            version += 1
            expected.update(form)
            stats.turns += 1
        if round_ == args.drops:
            # The last ack was "lost": re-send the turn; it must not be applied again.
            last = f"{round_}-{args.turns - 1}"
            ack, _ = await request(ws, {"type": "turn", "turn_id": last, "form": {"x": 1}})
            if ack.get("version") != version:
                stats.mismatches.append(f"session {i}: re-sent turn gave {ack}")
            await ws.send(json.dumps({"type": "bye"}))
            await ws.wait_closed()
            return
        await pending.pop(0).wait()  # everyone has finished this round's turns
        ws.transport.abort()  # a network drop: no close frame
        await pending.pop(0).wait()  # everyone has dropped: reconnect together
        resumed = True


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q / 100))]


async def main(args: argparse.Namespace) -> int:
    check_loopback(args.url)
    stats = Stats()
    meets = [Rendezvous(args.sessions) for _ in range(2 * args.drops)]
    start = time.perf_counter()
    results = await asyncio.gather(
        *(session(i, args, stats, meets) for i in range(args.sessions)),
        return_exceptions=True,
    )
    elapsed = time.perf_counter() - start
    failures = [r for r in results if isinstance(r, BaseException)]
    for failure in failures[:5]:
        print(f"session failed: {failure!r}", file=sys.stderr)
    report = {
        "sessions": args.sessions,
        "drops_per_session": args.drops,
        "turns_acked": stats.turns,
        "agent_messages": stats.messages,
        "elapsed_s": round(elapsed, 2),
        "turns_per_s": round(stats.turns / elapsed, 1),
        "hello_ms_p50_p99": [round(pct(stats.hello_ms, 50), 1), round(pct(stats.hello_ms, 99), 1)],
        "resume_ms_p50_p99": [
            round(pct(stats.resume_ms, 50), 1),
            round(pct(stats.resume_ms, 99), 1),
        ],
        "ack_ms_p50_p99": [round(pct(stats.ack_ms, 50), 1), round(pct(stats.ack_ms, 99), 1)],
        "lost_or_doubled": len(stats.mismatches),
        "failed_sessions": len(failures),
    }
    print(json.dumps(report, indent=2))
    for line in stats.mismatches[:10]:
        print(line, file=sys.stderr)
    return 1 if stats.mismatches or failures else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8765/ws", help="gateway (loopback only)")
    parser.add_argument("--sessions", type=int, default=200, help="concurrent sessions")
    parser.add_argument("--turns", type=int, default=5, help="turns per session between drops")
    parser.add_argument("--drops", type=int, default=2, help="simultaneous drops per session")
    parser.add_argument("--run", default=str(int(time.time())), help="call ID prefix of this run")
    return parser.parse_args(argv)


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse())))
