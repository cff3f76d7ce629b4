"""HAProxy and nginx in front of gateways, run from the shipped configs in deploy/.

The configs keep two placeholders (described at the top of each file): ``${HANGON_LB_BIND}``
for the listening address, and a block of server lines between ``# @backends begin`` and
``# @backends end``. Here the block is replaced by one line per backend port on 127.0.0.1,
each with the parameters of the block's first line, and the balancer listens on a free port.
"""

from __future__ import annotations

import csv
import io
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from tests.support.redis_server import free_port
from tests.support.tools import Started, ensure

__all__ = [
    "DEPLOY",
    "EchoBackend",
    "HAProxy",
    "Nginx",
    "ensure_haproxy",
    "ensure_nginx",
    "render_backends",
]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
"""The directory of the shipped load balancer configs."""

_BEGIN = "# @backends begin"
_END = "# @backends end"


def ensure_haproxy() -> str | None:
    """Return the path of haproxy, installing it with apt when running as root; else None."""
    return ensure("haproxy", "haproxy")


def ensure_nginx() -> str | None:
    """Return the path of nginx, installing it with apt when running as root; else None."""
    return ensure("nginx", "nginx")


def render_backends(text: str, servers: Callable[[str], list[str]]) -> str:
    """Replace the lines between the ``@backends`` markers with ``servers(first_line)``.

    Raises:
        ValueError: When the markers or a server line between them are missing.
    """
    lines = text.splitlines(keepends=True)
    try:
        begin = next(i for i, line in enumerate(lines) if line.strip() == _BEGIN)
        end = next(i for i, line in enumerate(lines) if line.strip() == _END)
    except StopIteration:
        raise ValueError(f"no {_BEGIN!r} ... {_END!r} block") from None
    block = [line for line in lines[begin + 1 : end] if line.strip().startswith("server ")]
    if not block:
        raise ValueError(f"no server line between {_BEGIN!r} and {_END!r}")
    indent = block[0][: len(block[0]) - len(block[0].lstrip())]
    rendered = [f"{indent}{line}\n" for line in servers(block[0].strip())]
    return "".join(lines[: begin + 1] + rendered + lines[end:])


class _Balancer(Started):
    """A load balancer process in the foreground, on a free port of 127.0.0.1."""

    name = ""

    def __init__(self, workdir: Path, backends: Sequence[int]) -> None:
        self.workdir = workdir
        self.backends = list(backends)
        self.port = free_port()
        """The port clients connect to."""
        self.log_path = workdir / f"{self.name}.log"
        """The process's standard output and error."""
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``ws://127.0.0.1:PORT``: add the WebSocket path."""
        return f"ws://127.0.0.1:{self.port}"

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 10) -> None:
        """Render the config, start the process and wait until the port accepts.

        Raises:
            RuntimeError: When the process exits or the port stays closed; with its log.
        """
        self.workdir.mkdir(parents=True, exist_ok=True)
        command = self._command()
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                env=self._env(),
                # Its own process group, so that stop() can end the workers too.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.proc = None
                raise RuntimeError(f"{self.name} exited:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise RuntimeError(
            f"{self.name} did not listen on {self.port} in {timeout} s:\n{self.log()}"
        )

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM (a fast stop that drops connections), then SIGKILL after ``timeout``."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        """What the process wrote so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class HAProxy(_Balancer):
    """HAProxy running ``deploy/haproxy.cfg`` in front of gateways on 127.0.0.1.

    Backend ``i`` (0-based) of ``backends`` is the server ``g{i + 1}`` of the backend
    ``gateways``. A second config file adds a stats socket in ``workdir`` for
    :meth:`server_states`.

    Args:
        workdir: Where the rendered config, the socket and the log go.
        backends: Ports of the gateways.
    """

    name = "haproxy"

    def __init__(self, workdir: Path, backends: Sequence[int]) -> None:
        super().__init__(workdir, backends)
        self.config_path = workdir / "haproxy.cfg"
        self.socket_path = workdir / "haproxy.sock"

    def _command(self) -> list[str]:
        binary = ensure_haproxy()
        if binary is None:
            raise RuntimeError("haproxy not found: apt-get install haproxy")

        def servers(first: str) -> list[str]:
            params = first.split()[3:]  # server NAME ADDRESS PARAMS...
            return [
                " ".join(["server", f"g{i}", f"127.0.0.1:{port}", *params])
                for i, port in enumerate(self.backends, 1)
            ]

        text = (DEPLOY / "haproxy.cfg").read_text()
        self.config_path.write_text(render_backends(text, servers))
        extra = self.workdir / "haproxy-test.cfg"
        extra.write_text(f'global\n    stats socket "{self.socket_path}" mode 600 level admin\n')
        # -db: stay in the foreground; -f twice: the files are read in turn.
        return [binary, "-db", "-f", str(self.config_path), "-f", str(extra)]

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HANGON_LB_BIND": f"127.0.0.1:{self.port}"}

    def server_states(self) -> dict[str, str]:
        """The health of each server, from the stats socket: ``{"g1": "UP", "g2": "DOWN"}``."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.socket_path))
            sock.sendall(b"show stat\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        text = b"".join(chunks).decode().removeprefix("# ")
        return {
            row["svname"]: row["status"]
            for row in csv.DictReader(io.StringIO(text))
            if row["pxname"] == "gateways" and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_state(self, server: str, state: str, timeout: float = 5) -> None:
        """Wait until ``server`` (``g1``, ...) has the health ``state`` (``UP``, ``DOWN``).

        Raises:
            RuntimeError: After ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        while (states := self.server_states()).get(server) != state:
            if time.monotonic() >= deadline:
                raise RuntimeError(f"{server} not {state} in {timeout} s: {states}")
            time.sleep(0.05)


class Nginx(_Balancer):
    """nginx serving ``deploy/nginx.conf`` in front of gateways on 127.0.0.1.

    The shipped file is for an http block; here it is included from a main config in
    ``workdir`` that puts the pid file, logs and temporary files there too, so that
    nginx runs without root.

    Args:
        workdir: Where the rendered configs, the logs and the temporary files go.
        backends: Ports of the gateways.
    """

    name = "nginx"

    def __init__(self, workdir: Path, backends: Sequence[int]) -> None:
        super().__init__(workdir, backends)
        self.config_path = workdir / "nginx.conf"
        self.access_log_path = workdir / "access.log"

    def _command(self) -> list[str]:
        binary = ensure_nginx()
        if binary is None:
            raise RuntimeError("nginx not found: apt-get install nginx")

        def servers(first: str) -> list[str]:
            params = first.split()[2:]  # server ADDRESS PARAMS...;
            if not params or not params[-1].endswith(";"):
                params.append(";")
            return [" ".join(["server", f"127.0.0.1:{port}", *params]) for port in self.backends]

        text = (DEPLOY / "nginx.conf").read_text()
        text = render_backends(text, servers).replace("${HANGON_LB_BIND}", f"127.0.0.1:{self.port}")
        site = self.workdir / "hangon.conf"
        site.write_text(text)
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        temp_paths = "".join(
            f"    {kind}_temp_path {tmp / kind};\n"
            for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
        )
        self.config_path.write_text(
            # Two workers: the upstream's shared zone keeps one round robin between them.
            "worker_processes 2;\n"
            f"pid {self.workdir / 'nginx.pid'};\n"
            "events {\n    worker_connections 1024;\n}\n"
            "http {\n"
            f"    access_log {self.access_log_path};\n"
            f"{temp_paths}"
            f"    include {site};\n"
            "}\n"
        )
        return [
            binary,
            "-p",
            str(self.workdir),
            "-e",
            str(self.log_path),
            "-c",
            str(self.config_path),
            "-g",
            "daemon off;",
        ]


class EchoBackend:
    """A stand-in for a gateway: ``GET /readyz``, and WebSockets that say its name, then echo.

    Set ``ready`` to False and it answers ``/readyz`` and upgrade requests with 503, as a
    draining gateway does.

    Args:
        name: What it sends first on each WebSocket.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.ready = True
        """Whether /readyz answers 200 and upgrades are accepted."""
        self.port = 0
        """The port it listens on, once started."""
        self.server: Server | None = None

    async def _process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | None:
        if request.path == "/readyz":
            if self.ready:
                return connection.respond(200, "ready\n")
            return connection.respond(503, "draining\n")
        if not self.ready:
            return connection.respond(503, "draining\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        await ws.send(self.name)
        async for message in ws:
            await ws.send(message)

    async def __aenter__(self) -> EchoBackend:
        self.server = await serve(
            self._handler, "127.0.0.1", 0, process_request=self._process_request
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def aclose(self) -> None:
        """Stop listening and close its WebSockets, as a crashed gateway would vanish."""
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
