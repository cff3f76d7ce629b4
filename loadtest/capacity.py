"""``python -m loadtest capacity``: what one session costs the gateway and Redis, per phase.

Holds ``--sessions`` sessions on a running gateway (``--gateway-pid``) and its private Redis
(``--redis-url``), and measures four phases one after the other: the connects (a new
session's restore), ``--idle`` seconds of quiet (keepalive pings and renewals only), turns
(``--turns`` per session, one at a time, each waiting for its ack), and a drop storm (every
connection aborted at once, every session resumed). For each phase it prints the gateway's
CPU, Redis's CPU and its ``EVALSHA`` calls and their time (``INFO commandstats``), per unit of
work, and the growth of Redis's ``used_memory``. See docs/capacity.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from gateway.cli import tune_gc
from gateway.client import Client, Restored
from loadtest.net import check_loopback, raise_nofile_limit, sample_process, source_address

__all__ = ["main"]


def _redis_sample(r: redis.Redis) -> dict[str, float]:
    """Redis's CPU seconds, its ``EVALSHA`` calls and their microseconds, used memory and
    connected clients."""
    stats = r.info("commandstats").get("cmdstat_evalsha", {"calls": 0, "usec": 0})
    cpu = r.info("cpu")
    return {
        "cpu_s": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
        "evalsha": float(stats["calls"]),
        "evalsha_usec": float(stats["usec"]),
        "used_memory": float(r.info("memory")["used_memory"]),
        "clients": float(r.info("clients")["connected_clients"]),
    }


async def _phase(
    name: str,
    units: Callable[[], int],
    unit: str,
    pid: int,
    r: redis.Redis,
    body: Callable[[], Awaitable[None]],
) -> dict[str, Any]:
    """Run ``body`` and report what it cost per ``unit`` (``units()`` counted after it)."""
    gw0, rd0, t0 = sample_process(pid), _redis_sample(r), time.monotonic()
    await body()
    gw1, rd1, t1 = sample_process(pid), _redis_sample(r), time.monotonic()
    n = max(units(), 1)
    calls = rd1["evalsha"] - rd0["evalsha"]
    return {
        "phase": name,
        "unit": unit,
        "units": n,
        "seconds": round(t1 - t0, 2),
        "gateway_cpu_s": round(gw1.cpu_seconds - gw0.cpu_seconds, 3),
        "gateway_cpu_us_per_unit": round((gw1.cpu_seconds - gw0.cpu_seconds) / n * 1e6, 1),
        "evalsha_per_unit": round(calls / n, 4),
        "redis_usec_per_evalsha": round(
            (rd1["evalsha_usec"] - rd0["evalsha_usec"]) / max(calls, 1), 2
        ),
        "redis_cpu_us_per_evalsha": round((rd1["cpu_s"] - rd0["cpu_s"]) / max(calls, 1) * 1e6, 2),
        "redis_cpu_us_per_unit": round((rd1["cpu_s"] - rd0["cpu_s"]) / n * 1e6, 2),
        "redis_clients": int(rd1["clients"]),
        "redis_memory_growth_per_session": round(
            (rd1["used_memory"] - rd0["used_memory"]) / max(len(_clients), 1), 1
        ),
    }


_clients: list[Client] = []


async def _run(args: argparse.Namespace) -> list[dict[str, Any]]:
    host = check_loopback(args.url)
    check_loopback(args.redis_url)
    raise_nofile_limit(args.sessions * 2 + 256)
    r = redis.Redis.from_url(args.redis_url)
    welcomes = [0]
    messages = [0]

    def restored(_: Restored) -> None:
        welcomes[0] += 1

    def message(_: Any, __: int) -> None:
        messages[0] += 1

    for i in range(args.sessions):
        _clients.append(
            Client(
                args.url,
                {"user_id": f"cap-{args.run}-{i}", "call_id": args.run},
                on_restored=restored,
                on_message=message,
                heartbeat_interval=None,  # browsers and Twilio never ping; the gateway does
                open_timeout=30,
                local_addr=source_address(i, host),
            )
        )
    runners: list[asyncio.Task[None]] = []
    sem = asyncio.Semaphore(args.connect_concurrency)

    async def until(count: int) -> None:
        while welcomes[0] < count:
            await asyncio.sleep(0.05)

    async def connect() -> None:
        async def one(c: Client) -> None:
            async with sem:
                runners.append(asyncio.create_task(c.run()))
                await c.connected.wait()

        await asyncio.gather(*(one(c) for c in _clients))
        await until(args.sessions)

    async def idle() -> None:
        await asyncio.sleep(args.idle)

    async def turns() -> None:
        async def one(c: Client, i: int) -> None:
            for t in range(args.turns):
                await c.turn(f"t{t}", form={f"q{t}": f"answer {i} {t}"})

        await asyncio.gather(*(one(c, i) for i, c in enumerate(_clients)))
        if args.downstream:
            await asyncio.sleep(2)  # the agent's answers to the last turns

    async def storm() -> None:
        before = welcomes[0]
        for c in _clients:
            c.abort()
        await until(before + args.sessions)

    results = [
        await _phase("connect", lambda: args.sessions, "new session", args.gateway_pid, r, connect)
    ]
    results.append(
        await _phase(
            "idle", lambda: args.sessions * args.idle, "session-second", args.gateway_pid, r, idle
        )
    )
    m0 = messages[0]
    results.append(
        await _phase(
            "turns", lambda: args.sessions * args.turns, "turn", args.gateway_pid, r, turns
        )
    )
    results[-1]["agent_messages_per_turn"] = round(
        (messages[0] - m0) / (args.sessions * args.turns), 3
    )
    results.append(
        await _phase("storm", lambda: args.sessions, "restore", args.gateway_pid, r, storm)
    )
    results.append(
        {
            "redis_used_memory": int(_redis_sample(r)["used_memory"]),
            "gateway_rss_bytes": sample_process(args.gateway_pid).rss_bytes,
        }
    )
    for c in _clients:
        await c.aclose()
    await asyncio.gather(*runners, return_exceptions=True)
    r.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest capacity", description=__doc__)
    parser.add_argument("--url", required=True, help="the gateway's ws://127.0.0.1:PORT/ws")
    parser.add_argument("--redis-url", required=True, help="the gateway's private Redis")
    parser.add_argument("--gateway-pid", type=int, required=True)
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of quiet")
    parser.add_argument("--turns", type=int, default=10, help="turns per session")
    parser.add_argument("--connect-concurrency", type=int, default=200)
    parser.add_argument(
        "--downstream",
        action="store_true",
        help="the gateway has an agent: wait for its last answers",
    )
    parser.add_argument("--run", default=str(int(time.time())), help="call ID of this run")
    args = parser.parse_args()
    tune_gc()
    for line in asyncio.run(_run(args)):
        print(json.dumps(line))
    return 0
