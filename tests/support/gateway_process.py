"""The gateway (or the demo agent) as a real subprocess (``python -m gateway ...``), for crash
tests."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["GatewayProcess"]

_LISTENING = re.compile(r"listening host=\S+ port=(\d+)")


class GatewayProcess:
    """One ``hangon serve`` process on a free port; its log goes to ``log_path``.

    ``command="demo-agent"`` runs the demo agent instead; ``port`` asks for a given port
    (to restart a process where its clients expect it).
    """

    def __init__(self, log_path: Path, *args: str, command: str = "serve", port: int = 0) -> None:
        self.log_path = log_path
        self.args = args
        self.command = command
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = port

    def start(self, timeout: float = 15) -> None:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", self.command, "--port", str(self.port), *self.args],
            stdout=log,
            stderr=log,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        offset = log.tell()
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as f:
                f.seek(offset)
                found = _LISTENING.search(f.read().decode(errors="replace"))
            if found:
                self.port = int(found.group(1))
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            time.sleep(0.05)
        raise RuntimeError(f"gateway did not start: {self.log_path.read_text()}")

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye, as a crash or an OOM kill."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM and wait: a client still connected is closed within the drain period
        (10 s unless the test set --drain-period), so wait longer than that."""
        assert self.proc is not None
        self.proc.terminate()
        return self.proc.wait(timeout)
