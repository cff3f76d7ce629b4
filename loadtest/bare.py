"""A bare websockets server: the yardstick that hangon's load-test costs are divided by.

``connect`` mode answers a connection's first message with one small JSON message, then
leaves the connection idle until the client closes it; ``echo`` mode answers every message
with a small JSON ack. Nothing else: no state beyond what websockets keeps, no keepalive
pings (an idle connection costs no CPU), no compression. :mod:`loadtest.baseline` runs it
and measures it. It logs ``listening host=... port=...`` on stderr when ready and exits
cleanly on SIGTERM or SIGINT. :class:`BareServer` runs it as a subprocess.

    python -m loadtest.bare --port 8790 --mode echo

The phone-audio baseline lives here too: :func:`serve_relay`, a bare relay of Twilio-format
frames to an agent, and :func:`serve_agent`, the echo agent behind it and behind hangon
(``loadtest audio`` runs both as processes of their own).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import sys
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import orjson
import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from loadtest.net import ProcessSample, sample_process

__all__ = [
    "BACKLOG",
    "HANDLERS",
    "BareServer",
    "ack_each",
    "answer_first",
    "main",
    "parse",
    "run",
    "serve_agent",
    "serve_relay",
]

BACKLOG = 2048
"""Pending connections the listening socket queues (``listen()`` backlog)."""


async def answer_first(ws: ServerConnection) -> None:
    """Answer the first message with a welcome, then stay idle until the client closes."""
    try:
        await ws.recv()
        await ws.send(orjson.dumps({"type": "welcome"}), text=True)
    except ConnectionClosed:
        return
    # Returning would close the connection: websockets closes it when the handler ends.
    await ws.wait_closed()


async def ack_each(ws: ServerConnection) -> None:
    """Answer every message with an ack that counts the messages so far."""
    n = 0
    try:
        async for _ in ws:
            n += 1
            await ws.send(orjson.dumps({"type": "ack", "n": n}), text=True)
    except ConnectionClosed:
        return


HANDLERS: dict[str, Callable[[ServerConnection], Awaitable[None]]] = {
    "connect": answer_first,
    "echo": ack_each,
}
"""The connection handler of each ``--mode``."""


async def run(host: str, port: int, mode: str) -> None:
    """Serve ``mode`` on ``host``:``port`` (0: any free port) until SIGTERM or SIGINT."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with serve(
        HANDLERS[mode],
        host,
        port,
        compression=None,
        ping_interval=None,
        backlog=BACKLOG,
    ) as server:
        bound = server.sockets[0].getsockname()[1]
        print(f"listening host={host} port={bound} mode={mode}", file=sys.stderr, flush=True)
        await stop.wait()
    # Leaving the block closed every connection (1001) and waited for the handlers.


class BareServer:
    """``python -m loadtest.bare`` as a subprocess on a free port; :meth:`start` makes one."""

    def __init__(self, proc: asyncio.subprocess.Process, host: str, port: int) -> None:
        self.proc = proc
        self.url = f"ws://{host}:{port}/"
        self.log: deque[str] = deque(maxlen=20)
        """The last lines the server wrote to stderr."""
        assert proc.stderr is not None
        self._drain = asyncio.create_task(self._read(proc.stderr))

    @property
    def pid(self) -> int:
        """The server's process ID."""
        return self.proc.pid

    @classmethod
    async def start(
        cls, mode: str, *, host: str = "127.0.0.1", timeout: float = 30.0
    ) -> BareServer:
        """Start the server in ``mode`` and wait until it is listening."""
        proc = await asyncio.create_subprocess_exec(
            *(sys.executable, "-m", "loadtest.bare", "--host", host, "--port", "0"),
            *("--mode", mode),
            cwd=_ROOT,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            port = await asyncio.wait_for(_listening_port(proc), timeout)
        except BaseException:
            await _stop(proc, 5.0)
            raise
        return cls(proc, host, port)

    async def _read(self, stream: asyncio.StreamReader) -> None:
        """Keep the stderr pipe drained so that the server never blocks writing to it."""
        while line := await stream.readline():
            self.log.append(line.decode(errors="replace").rstrip())

    def sample(self) -> ProcessSample:
        """The server's CPU seconds and RSS now; ``RuntimeError`` if it has exited."""
        sample = sample_process(self.pid)
        if sample is None:
            raise RuntimeError(f"loadtest.bare (pid {self.pid}) is gone: {list(self.log)}")
        return sample

    async def aclose(self, *, timeout: float = 15.0) -> int:
        """SIGTERM the server, SIGKILL it if it is still there after ``timeout``; return its
        exit code."""
        try:
            return await _stop(self.proc, timeout)
        finally:
            self._drain.cancel()


_ROOT = Path(__file__).resolve().parent.parent
"""The checkout, where ``python -m loadtest.bare`` finds the ``loadtest`` package."""
_LISTENING = re.compile(r"listening host=\S+ port=(\d+)")


async def _listening_port(proc: asyncio.subprocess.Process) -> int:
    """Read ``proc``'s stderr until the ``listening`` line; return the port it names."""
    assert proc.stderr is not None
    seen: deque[str] = deque(maxlen=20)
    while line := (await proc.stderr.readline()).decode(errors="replace"):
        if found := _LISTENING.search(line):
            return int(found.group(1))
        seen.append(line)
    raise RuntimeError(f"loadtest.bare exited before listening: {''.join(seen)}")


async def _stop(proc: asyncio.subprocess.Process, timeout: float) -> int:
    """Terminate ``proc``, kill it after ``timeout`` seconds; return its exit code."""
    if proc.returncode is None:
        proc.terminate()
        try:
            return await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            proc.kill()
    return await proc.wait()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.bare", description=(__doc__ or "").split("\n\n")[0]
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, required=True, help="port; 0 picks a free one")
    parser.add_argument("--mode", choices=sorted(HANDLERS), default="connect")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the server under uvloop."""
    args = parse(argv)
    uvloop.run(run(args.host, args.port, args.mode))


if __name__ == "__main__":
    main()


# The echo agent and the bare relay


async def serve_agent(port: int) -> None:
    """Answer every ``media`` frame of every link with the same payload, until cancelled."""

    async def link(ws: ServerConnection) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                frame = orjson.loads(raw)
                if frame.get("type") == "media":
                    echo = {"type": "media", "payload": frame["payload"]}
                    await ws.send(orjson.dumps(echo).decode())

    async with serve(link, "127.0.0.1", port, compression=None, backlog=2048) as server:
        print(f"listening host=127.0.0.1 port={_port(server)}", file=sys.stderr, flush=True)
        await asyncio.Future()


async def serve_relay(port: int, agent_url: str) -> None:
    """A bare relay: Twilio frames in, one agent connection per call, media both ways."""

    async def call(ws: ServerConnection) -> None:
        stream_sid = ""
        agent: ClientConnection | None = None
        back: asyncio.Task[None] | None = None

        async def from_agent(link: ClientConnection) -> None:
            async for raw in link:
                frame = orjson.loads(raw)
                if frame.get("type") == "media":
                    media = {"payload": frame["payload"]}
                    out = {"event": "media", "streamSid": stream_sid, "media": media}
                    await ws.send(orjson.dumps(out).decode())

        try:
            async for raw in ws:
                event = orjson.loads(raw)
                kind = event.get("event")
                if kind == "media" and agent is not None:
                    media = event["media"]
                    frame = {"type": "media", "track": media.get("track")}
                    frame["payload"] = media["payload"]
                    await agent.send(orjson.dumps(frame).decode())
                elif kind == "start" and agent is None:
                    stream_sid = event["start"]["streamSid"]
                    agent = await connect(agent_url, compression=None)
                    await agent.send(orjson.dumps({"type": "session.start"}).decode())
                    back = asyncio.create_task(from_agent(agent))
        except ConnectionClosed:
            pass
        finally:
            if back is not None:
                back.cancel()
            if agent is not None:
                await agent.close()

    async with serve(call, "127.0.0.1", port, compression=None, backlog=2048) as server:
        print(f"listening host=127.0.0.1 port={_port(server)}", file=sys.stderr, flush=True)
        await asyncio.Future()


def _port(server: Any) -> int:
    return int(next(iter(server.sockets)).getsockname()[1])


# The driver
