"""``hangon`` command line. The only module that reads ``os.environ`` or picks an event loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.multiprocess import mark_process_dead

from gateway import __version__
from gateway.config import OPTIONS, Config, from_values
from gateway.core import codec
from gateway.core.sealing import new_key, parse_state_keys
from gateway.demo_agent import serve_demo_agent
from gateway.exceptions import ConfigError
from gateway.metrics import SHARED_DIR_ENV
from gateway.server import Gateway

__all__ = ["JsonFormatter", "build_parser", "config_from_args", "main", "tune_gc"]

log = logging.getLogger("gateway")

_METAVARS = {"max_turns_per_second": "RATE", "degrade_after": "SECONDS"}
"""Metavars that the last word of the option's name would not give."""

_WORKER_ENV = "HANGON_WORKER"
"""Set by ``--workers`` in each worker process: its index."""


@dataclass(frozen=True, slots=True)
class _LogFlag:
    """A flag of ``serve`` and ``demo-agent`` that sets up logging, with its ``HANGON_*``
    variable. Not part of :class:`Config`: the log is set up before the config is read,
    and ``demo-agent`` has no config."""

    name: str
    default: str
    choices: tuple[str, ...]
    clean: Callable[[str], str]
    """Applied to the flag and the variable before they are checked."""
    help: str

    @property
    def env(self) -> str:
        return "HANGON_" + self.name.upper()

    def problem(self) -> str:
        """What an error says of a bad variable."""
        if len(self.choices) == 2:
            return "must be " + " or ".join(self.choices)
        return "must be one of " + ", ".join(self.choices)


_LOG_LEVEL = _LogFlag(
    "log_level",
    "INFO",
    ("DEBUG", "INFO", "WARNING", "ERROR"),
    lambda text: text.strip().upper(),
    "log level",
)
_LOG_FORMAT = _LogFlag(
    "log_format",
    "text",
    ("text", "json"),
    lambda text: text.strip().lower(),
    "text: one line per record; json: one JSON object per line, each key=value a field",
)
_LOG_FLAGS = (_LOG_LEVEL, _LOG_FORMAT)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop]:
    """uvloop where it is installed (like uvicorn's ``loops/auto.py``), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.new_event_loop
    return uvloop.new_event_loop


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    """Return the parser; ``environ`` is only shown, not applied, in ``--help``."""
    parser = argparse.ArgumentParser(prog="hangon", description="WebSocket reconnect gateway.")
    parser.add_argument("--version", action="version", version=f"hangon {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway. Every option can also be set with the environment "
        "variable shown; a flag beats the variable, the variable beats the default. "
        "'none' disables an option that allows it.",
    )
    for option in OPTIONS:
        note = ""
        if option.env in environ:
            shown_env = "set" if option.secret else f"now {environ[option.env]!r}"
            note = f" [{shown_env} from env]"
        serve.add_argument(
            option.flag,
            dest=option.name,
            metavar=_METAVARS.get(option.name, option.name.split("_")[-1].upper()),
            help=f"{option.help} (default: {option.default_text()}; env {option.env}){note}",
        )
    demo = sub.add_parser(
        "demo-agent",
        help="run the demo voice agent on its own",
        description="Run the demo voice agent (appointment booking) as a WebSocket server, "
        "to stand in for a real agent: hangon serve --downstream ws://HOST:PORT/",
    )
    demo.add_argument("--host", default="127.0.0.1", help="interface (default: %(default)s)")
    demo.add_argument(
        "--port", type=int, default=8766, help="TCP port; 0 picks one (default: %(default)s)"
    )
    keygen = sub.add_parser(
        "keygen",
        help="print new keys for sealing stored state, as environment variables",
        description="Print a new state key and caller hash key, as HANGON_STATE_KEYS and "
        "HANGON_CALLER_HASH_KEY lines for an environment file. Every instance sharing a "
        "Redis needs the same ones. To rotate the state key: add the new one second in "
        "HANGON_STATE_KEYS on every instance, then move it first, then drop the old one once "
        "--ttl has passed; never change the caller hash key (docs/configuration.md).",
    )
    keygen.add_argument(
        "--key-id",
        default=None,
        help="ID of the new state key (default: k and today's date, e.g. k20261126)",
    )
    for command in (serve, demo):
        for flag in _LOG_FLAGS:
            command.add_argument(
                "--" + flag.name.replace("_", "-"),
                # argparse passes a default through ``type`` but not through ``choices``:
                # main() checks the variable.
                default=environ.get(flag.env, flag.default),
                type=flag.clean,
                choices=flag.choices,
                help=f"{flag.help} (default: {flag.default}; env {flag.env})",
            )
    return parser


def config_from_args(args: argparse.Namespace, environ: Mapping[str, str]) -> Config:
    """Merge defaults, ``HANGON_*`` variables and flags into a :class:`Config`.

    Raises:
        ConfigError: Naming the flag or variable with the bad value.
    """
    values = {o: (o.env, environ[o.env]) for o in OPTIONS if o.env in environ}
    for option in OPTIONS:
        text = getattr(args, option.name)
        if text is not None:
            values[option] = (option.flag, text)
    return from_values(values)


_GC_THRESHOLD = 200_000
"""Container allocations between gen-0 collections (Python's default is 700). A turn's
objects (the new state, its write, the recent turns) live about as long as the gap between
two turns of a session, so collections that come less often find fewer of them alive: at
20,000, 15 collections examined them during a 50,000-turn phase of a 10,000-session storm
and took 15 % of its CPU, and they found 414 objects to free in the whole run. Cycles are
rare here (closed connections are freed by reference counting), so what waits longer for
a collection is little."""


class _Stamps:
    """A log line's time, formatted once per second: ``localtime`` and ``strftime`` on
    every line were a quarter of the formatter's cost (3.4 against 2.5 µs a line)."""

    __slots__ = ("_convert", "_fmt", "_last")

    def __init__(self, convert: Callable[[float | None], time.struct_time], fmt: str) -> None:
        self._convert = convert
        self._fmt = fmt
        self._last: tuple[int, str] = (-1, "")

    def __call__(self, created: float) -> str:
        second = int(created)
        last = self._last
        if last[0] != second:
            last = self._last = (second, time.strftime(self._fmt, self._convert(created)))
        return last[1]


class _Formatter(logging.Formatter):
    """``time level logger message`` on one line; messages are ``event key=value ...``."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self._stamps = _Stamps(time.localtime, self.default_time_format)

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._stamps(record.created)},{int(record.msecs):03d}"


_FIELD = re.compile(r"(?<!\S)([a-z_]+)=(\S*)")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``time`` (UTC), ``level``, ``logger``, ``event`` (the words
    before the first ``key=value``), ``message`` (the whole line), then every ``key=value`` of
    the message as a field of its own (``session``, ``tenant``, ``caller``, ``error``, ...),
    and ``exception`` with its traceback if there is one.

    The messages are the same as in the text format: the gateway never logs a phone number,
    user ID, form answer or turn text in either.
    """

    def __init__(self) -> None:
        super().__init__()
        self._stamps = _Stamps(time.gmtime, "%Y-%m-%dT%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        first = _FIELD.search(message)
        stamp = self._stamps(record.created)
        entry: dict[str, object] = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "event": (message[: first.start()] if first else message).strip().rstrip(":"),
            "message": message,
        }
        if first is not None:
            for key, value in _FIELD.findall(message[first.start() :]):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return codec.dumps(entry).decode()


def _lean_log_records() -> None:
    """Leave out of every log record what neither format shows: the caller's file, line
    and function (a walk up the stack), the process ID (a system call), thread and
    process names. The "Optimization" section of Python's logging HOWTO names these
    switches. One ``session open`` line per restore was 8 % of a reconnect storm's CPU,
    most of it there."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def tune_gc() -> None:
    """Keep the cyclic garbage collector's cost flat as sessions accumulate.

    Everything loaded at start-up lives as long as the process: frozen, it is left out of
    every collection. Sessions are freed by reference counting; with the default gen-0
    threshold of 700 allocations, ten thousand sessions' objects are scanned over and over
    during a storm. The load-test tools call it too: with Python's defaults, a 5000-session
    storm spent 7.3 s of the tool's own CPU in collections while its clients waited.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(_GC_THRESHOLD, 20, 100)


def _raise_open_files() -> None:
    """Raise the soft open-file limit to the hard one: a process that holds a descriptor
    per client must not stop at a runtime's soft default of 1024 (docs/capacity.md)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    log.info("open files: soft limit %d", resource.getrlimit(resource.RLIMIT_NOFILE)[0])


async def _serve(config: Config) -> None:
    signals = _signals()
    _raise_open_files()
    gateway = Gateway(config)
    if config.store.redis_url is None:
        log.warning(
            "store=memory: sessions live in this process only and do not survive a restart; "
            "set --redis-url for durable sessions"
        )
    else:
        log.info("store=redis prefix=%s", config.store.key_prefix)
    keyring = gateway.store.settings.keyring
    if keyring.ephemeral:
        log.warning(
            "sealing: state is sealed with a random key made at start-up (no --state-keys);"
            " fine for the embedded store, which keeps nothing past the process"
        )
    else:
        log.info("sealing: AES-256-GCM keys=%s (newest first)", ",".join(keyring.key_ids))
    security = config.security
    if security.auth_keys:
        tenants = sorted({key.tenant for key in security.auth_keys})
        log.info(
            "auth: signed tokens required keys=%d tenants=%s",
            len(security.auth_keys),
            ",".join(tenants),
        )
        if config.twilio.twilio_path is not None and not config.twilio.twilio_auth_token:
            log.warning(
                "auth: Twilio streams carry no token and are not authenticated: set "
                "HANGON_TWILIO_AUTH_TOKEN, or --twilio-path none"
            )
    else:
        log.warning(
            "authentication is off: a hello without a resume token may resume any session "
            "of its caller key; set HANGON_AUTH_KEYS"
        )
    await gateway.start()
    tune_gc()
    down = config.agent.downstream
    log.info(
        "agent=%s",
        "off: sessions only store state"
        if down == "off"
        else "demo: the demo agent runs in this process (--downstream names a real one)"
        if down == "demo"
        else down,
    )
    log.info(
        "listening host=%s port=%d path=%s loop=%s instance=%s",
        config.server.host,
        gateway.port,
        config.server.path,
        _loop_name(),
        gateway.instance,
    )
    await signals.get()
    log.info(
        "draining: /readyz fails, clients are closed with 1012 over %.1f s "
        "(signal again to close them now)",
        config.server.drain_period,
    )
    drain = asyncio.create_task(gateway.drain())
    second = asyncio.create_task(signals.get())
    await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
    second.cancel()
    if not drain.done():
        log.warning("second signal: closing every connection now")
        drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    await gateway.aclose()
    log.info("stopped")


async def _supervise(argv: Sequence[str], workers: int) -> int:
    """Run ``workers`` gateway processes on one port; pass signals on; restart crashed ones."""
    signals = _signals()
    stopping = False
    procs: dict[int, asyncio.subprocess.Process] = {}
    # One scrape of the shared port answers for every worker (gateway.metrics): each keeps
    # its values in files here, and the worker that takes the scrape reads them all.
    shared = tempfile.mkdtemp(prefix="hangon-metrics-")
    env = {**os.environ, SHARED_DIR_ENV: shared}

    async def run(index: int) -> int:
        while True:
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "gateway",
                *argv,
                env={**env, _WORKER_ENV: str(index)},
                # Out of the terminal's process group: a Ctrl-C reaches the workers once,
                # forwarded from here, and starts their drain rather than skipping it.
                start_new_session=True,
            )
            procs[index] = proc
            log.info("worker started index=%d pid=%d", index, proc.pid)
            if stopping:
                proc.send_signal(signal.SIGTERM)  # the signal came while it was starting
            code = await proc.wait()
            # Its gauges go (its sessions are gone); its counters stay in the totals.
            mark_process_dead(proc.pid, shared)  # type: ignore[no-untyped-call]
            if stopping:
                return code
            log.error("worker exited index=%d code=%d: starting it again in 1 s", index, code)
            await asyncio.sleep(1.0)
            if stopping:
                return code

    runs = [asyncio.create_task(run(i)) for i in range(workers)]
    waiting = asyncio.ensure_future(asyncio.gather(*runs))
    while not waiting.done():
        got = asyncio.create_task(signals.get())
        either: set[asyncio.Future[Any]] = {waiting, got}
        await asyncio.wait(either, return_when=asyncio.FIRST_COMPLETED)
        if got.done():
            stopping = True
            for proc in procs.values():
                if proc.returncode is None:
                    proc.send_signal(got.result())
        else:
            got.cancel()
    codes = waiting.result()
    shutil.rmtree(shared, ignore_errors=True)
    log.info("workers stopped codes=%s", codes)
    return 0 if all(code == 0 for code in codes) else 1


async def _demo_agent(host: str, port: int) -> None:
    signals = _signals()
    server = await serve_demo_agent(host, port)
    bound = server.sockets[0].getsockname()[1]
    log.info("demo agent listening host=%s port=%d loop=%s", host, bound, _loop_name())
    await signals.get()
    server.close()
    await server.wait_closed()


def _loop_name() -> str:
    return type(asyncio.get_running_loop()).__module__.split(".")[0]


def _signals() -> asyncio.Queue[int]:
    """Return a queue that receives each SIGTERM and SIGINT from now on."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, queue.put_nowait, sig)
    return queue


def _keygen(key_id: str | None) -> None:
    kid = key_id or time.strftime("k%Y%m%d")
    try:
        parse_state_keys(f"{kid}:{new_key()}")
    except ValueError as exc:
        print(f"hangon: error: --key-id={kid!r}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    print(f"HANGON_STATE_KEYS={kid}:{new_key()}")
    print(f"HANGON_CALLER_HASH_KEY={new_key()}")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``hangon`` console script and ``python -m gateway``."""
    environ = os.environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    if args.command == "keygen":
        _keygen(args.key_id)
        return
    for flag in _LOG_FLAGS:
        value = getattr(args, flag.name)
        if value not in flag.choices:  # only a variable can get here: see build_parser
            parser.error(f"{flag.env}={value!r}: {flag.problem()}")
    _lean_log_records()
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else _Formatter())
    logging.basicConfig(level=args.log_level, handlers=[handler])
    # One line per connection open and close drowns the log in a reconnect storm.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.getLogger().level))
    if args.command == "demo-agent":
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(_demo_agent(args.host, args.port))
        return
    try:
        config = config_from_args(args, environ)
    except ConfigError as exc:
        print(f"hangon: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    worker = environ.get(_WORKER_ENV)
    if config.server.workers > 1 and worker is None:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            code = runner.run(
                _supervise(sys.argv[1:] if argv is None else argv, config.server.workers)
            )
        raise SystemExit(code)
    if worker is not None and config.server.instance_id is not None:
        config = config.replace("server", instance_id=f"{config.server.instance_id}-{worker}")
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(config))
