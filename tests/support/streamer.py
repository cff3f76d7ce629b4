"""A caller that streams turns through faults on :class:`gateway.client.Client`, which
reconnects on any drop, resumes with its token and ``last_seq`` and re-sends the turn in
flight; this records every broken promise.

What it checks, each a problem naming the caller:

- every welcome after the first resumes the same session (``resumed``, same ID, no lost
  messages) and its state holds every acknowledged turn's answer;
- a turn's ack never names a version below an earlier ack's (a turn applied twice would);
- agent messages arrive numbered ``last_seq + 1``, each exactly once;
- the gateway never closes with a code that says "do not come back" (4500-4999).
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from typing import Any

from gateway.client import Client, Restored
from gateway.exceptions import ClientClosed

__all__ = ["Streamer"]


class Streamer:
    """One caller streaming ``text`` turns through ``url`` until :meth:`stop`."""

    def __init__(self, url: str, caller: dict[str, Any], *, pace: float = 0.3) -> None:
        self.url = url
        self.caller = caller
        self.pace = pace
        self.name = f"{caller.get('user_id')}/{caller.get('call_id')}"
        self.acked: dict[str, int] = {}
        """Turn ID to the version its ack named."""
        self.answers: dict[str, int] = {}
        """Form answers of the acknowledged turns."""
        self.messages = 0
        self.welcomes = 0
        self.closes: Counter[int | None] = Counter()
        self.problems: list[str] = []
        self._seq = 0
        self._session: str | None = None
        self._stop = asyncio.Event()
        self.client = self._client(None)

    def _client(self, token: str | None) -> Client:
        return Client(
            self.url,
            self.caller,
            initial_delay=0.05,
            max_delay=1.0,
            open_timeout=5,
            resume_token=token,
            last_seq=self._seq,
            on_restored=self._restored,
            on_message=self._message,
            on_reconnecting=lambda code, delay: self.closes.update([code]),
        )

    def stop(self) -> None:
        """Finish the turn in flight (until acked), then close (without bye)."""
        self._stop.set()

    def abort(self) -> None:
        """Drop the connection without a close frame, as a network blip would."""
        self.client.abort()

    async def run(self) -> None:
        """Talk until stopped; the client reconnects after every drop by itself."""
        runner = asyncio.create_task(self.client.run())
        try:
            n = 1
            last = 0
            while not self._stop.is_set():
                turn = self.client.turn(str(n), text=f"answer {n}", form={f"k{n}": n})
                version = await _unless_stopped(turn, runner)
                if version < last:
                    self.problems.append(f"{self.name}: turn {n} acked as {version} < {last}")
                last = version
                self.acked[str(n)] = version
                self.answers[f"k{n}"] = n
                n += 1
                await asyncio.sleep(self.pace * random.uniform(0.5, 1.5))
        except ClientClosed as exc:
            self.closes.update([exc.code])
            self.problems.append(f"{self.name}: client stopped: {exc}")
        finally:
            await self.client.aclose()
            if not runner.done():
                runner.cancel()
            with _suppress():
                await runner

    async def verify(self) -> None:
        """Connect once more and check what the welcome restores (see the module doc)."""
        self.client = self._client(self.client.resume_token)
        runner = asyncio.create_task(self.client.run())
        try:
            await asyncio.wait_for(self.client.connected.wait(), 10)
        finally:
            await self.client.aclose()
            with _suppress():
                await runner

    def _restored(self, restored: Restored) -> None:
        self.welcomes += 1
        if self._session is not None:
            if restored.session_id != self._session or not restored.resumed:
                self.problems.append(f"{self.name}: resumed into another session {restored}")
            if restored.replay_from is not None:
                self.problems.append(f"{self.name}: replay lost messages {restored}")
            held = restored.state.get("form_answers", {})
            lost = {k: v for k, v in self.answers.items() if held.get(k) != v}
            if lost:
                self.problems.append(f"{self.name}: acked answers lost {sorted(lost)}")
        self._session = restored.session_id

    def _message(self, data: Any, seq: int) -> None:
        if seq != self._seq + 1:
            self.problems.append(f"{self.name}: message {seq} after {self._seq}")
        self._seq = seq
        self.messages += 1


async def _unless_stopped(turn: Any, runner: asyncio.Task[None]) -> int:
    """The turn's ack, or the client's failure if it stops first."""
    acked = asyncio.ensure_future(turn)
    await asyncio.wait({acked, runner}, return_when=asyncio.FIRST_COMPLETED)
    if acked.done():
        return acked.result()
    acked.cancel()
    runner.result()  # raises ClientClosed
    raise ClientClosed(None, "the client stopped")


class _suppress:
    """Swallow what a stopped client's run() ends with."""

    def __enter__(self) -> None:
        return None

    def __exit__(self, et: object, exc: object, tb: object) -> bool:
        return isinstance(exc, ClientClosed | asyncio.CancelledError)
