"""The command line and configuration: flags, HANGON_* variables, defaults, errors."""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from gateway import cli
from gateway.config import OPTIONS, Config
from gateway.exceptions import ConfigError
from tests.support.gateway_process import GatewayProcess

DOCS = Path(__file__).parent.parent / "docs"


def parse(argv: list[str], environ: dict[str, str]) -> Config:
    args = cli.build_parser(environ).parse_args(["serve", *argv])
    return cli.config_from_args(args, environ)


def test_help_documents_every_option(capsys: pytest.CaptureFixture[str]) -> None:
    """`hangon serve --help` lists every option with its default and variable."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for option in OPTIONS:
        assert option.flag in out
        assert option.env in out
    assert "(default: 3600.0; env HANGON_TTL)" in out
    assert "(default: none; env HANGON_REDIS_URL)" in out
    assert "--log-level" in out


def test_help_lists_options_in_order(capsys: pytest.CaptureFixture[str]) -> None:
    """`hangon serve --help` describes the options in the order of OPTIONS, then the log flags."""
    with pytest.raises(SystemExit):
        cli.main(["serve", "--help"])
    described = capsys.readouterr().out.split("\noptions:\n", 1)[1]
    flags = re.findall(r"^  (--[a-z-]+)", described, re.MULTILINE)
    assert flags == [*(o.flag for o in OPTIONS), "--log-level", "--log-format"]


def test_demo_agent_flags_match_docs(capsys: pytest.CaptureFixture[str]) -> None:
    """The docs' `hangon demo-agent` table has the flags of its --help, each with the variable
    and default that --help gives it."""
    with pytest.raises(SystemExit):
        cli.main(["demo-agent", "--help"])
    out = capsys.readouterr().out
    described = " ".join(out.split("show this help message and exit", 1)[1].split())
    flag_help = r"(--[a-z-]+) .*?\(default: ([^;)]+)(?:; env (HANGON_[A-Z_]+))?\)"
    shown = {flag: (env, default) for flag, default, env in re.findall(flag_help, described)}
    assert len(shown) == 4
    section = (DOCS / "configuration.md").read_text().split("\n## `hangon demo-agent`\n", 1)[1]
    row = r"^\| `(--[a-z-]+)` \| `?([A-Z_]*)`? \| `([^`]*)` \|"
    rows = re.findall(row, section.split("\n## ", 1)[0], re.MULTILINE)
    assert {flag: (env, default) for flag, env, default in rows} == shown


def test_defaults() -> None:
    """With nothing set, the embedded memory store on 127.0.0.1:8765."""
    config = parse([], {})
    assert config == Config()
    assert config.store.redis_url is None
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8765)


def test_flag_beats_env_beats_default() -> None:
    """A flag overrides its HANGON_* variable, which overrides the default."""
    environ = {"HANGON_PORT": "9000", "HANGON_TTL": "120", "HANGON_MAX_AGE": "none"}
    config = parse(["--port", "9001"], environ)
    assert config.server.port == 9001
    assert config.store.ttl == 120.0
    assert config.store.max_age is None


def test_env_error_names_variable() -> None:
    """A bad variable is reported with its name and value."""
    with pytest.raises(ConfigError) as info:
        Config.from_env({"HANGON_TTL": "soon"})
    assert str(info.value).startswith("HANGON_TTL='soon':")


def test_flag_error_names_flag(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad flag exits 2 with one line naming the flag."""
    with pytest.raises(SystemExit) as info:
        cli.main(["serve", "--port", "-1"])
    assert info.value.code == 2
    assert "--port='-1': must not be negative" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("environ", "name"),
    [
        ({"HANGON_MAX_AGE": "7200", "HANGON_TTL": "3600"}, "HANGON_MAX_AGE"),
        ({"HANGON_KEY_PREFIX": "a{b}"}, "HANGON_KEY_PREFIX"),
        ({"HANGON_PATH": "ws"}, "HANGON_PATH"),
        ({"HANGON_MAX_MESSAGE_SIZE": "10"}, "HANGON_MAX_MESSAGE_SIZE"),
        ({"HANGON_MAX_STATE_SIZE": "10"}, "HANGON_MAX_STATE_SIZE"),
        ({"HANGON_PORT": "70000"}, "HANGON_PORT"),
        ({"HANGON_HOST": ""}, "HANGON_HOST"),
        ({"HANGON_HOST": "  "}, "HANGON_HOST"),
        ({"HANGON_RETRY_BUDGET": "-1"}, "HANGON_RETRY_BUDGET"),
        ({"HANGON_REDIS_MAX_CONNECTIONS": "0"}, "HANGON_REDIS_MAX_CONNECTIONS"),
        ({"HANGON_PING_INTERVAL": "0"}, "HANGON_PING_INTERVAL"),
        ({"HANGON_TTL": "nan"}, "HANGON_TTL"),
        ({"HANGON_TTL": "inf"}, "HANGON_TTL"),
        ({"HANGON_DEFAULT_REGION": "XX"}, "HANGON_DEFAULT_REGION"),
        ({"HANGON_DOWNSTREAM": "http://agent"}, "HANGON_DOWNSTREAM"),
        ({"HANGON_AGENT_LINGER": "-1"}, "HANGON_AGENT_LINGER"),
        ({"HANGON_REPLAY_WINDOW": "0"}, "HANGON_REPLAY_WINDOW"),
        # What the store scripts would refuse on every call: refused at start instead.
        ({"HANGON_MAX_STATE_SIZE": str(15 * 2**20 + 1)}, "HANGON_MAX_STATE_SIZE"),
        ({"HANGON_INSTANCE_ID": "i" * 513}, "HANGON_INSTANCE_ID"),
        ({"HANGON_SEND_TIMEOUT": "0"}, "HANGON_SEND_TIMEOUT"),
        ({"HANGON_MAX_SEND_QUEUE": "0"}, "HANGON_MAX_SEND_QUEUE"),
    ],
)
def test_invalid_values(environ: dict[str, str], name: str) -> None:
    """Out-of-range and inconsistent settings are refused, naming the setting."""
    with pytest.raises(ConfigError) as info:
        Config.from_env(environ)
    assert info.value.name == name


def test_cross_option_error_names_flag_when_flag_set() -> None:
    """A check across options names the flag when the flag set the value."""
    with pytest.raises(ConfigError) as info:
        parse(["--max-age", "7200"], {"HANGON_TTL": "3600"})
    assert info.value.name == "--max-age"


def test_region_is_normalised() -> None:
    """A lower-case region is accepted and upper-cased."""
    assert Config.from_env({"HANGON_DEFAULT_REGION": "gb"}).caller.default_region == "GB"


def test_bad_log_level_variable(capsys: pytest.CaptureFixture[str]) -> None:
    """A bad HANGON_LOG_LEVEL exits 2 naming the variable; lower case is fine."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANGON_LOG_LEVEL", "loud")
        with pytest.raises(SystemExit) as info:
            cli.main(["serve"])
    assert info.value.code == 2
    assert "HANGON_LOG_LEVEL='LOUD': must be one of DEBUG, INFO" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HANGON_LOG_LEVEL", "debug")
        args = cli.build_parser({"HANGON_LOG_LEVEL": "debug"}).parse_args(["serve"])
    assert args.log_level == "DEBUG"


def test_python_m_gateway() -> None:
    """`python -m gateway` is the same command line."""
    out = subprocess.run(
        [sys.executable, "-m", "gateway", "--version"], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "hangon 0.1.0"


@pytest.mark.slow
def test_startup_log_warns(tmp_path: Path) -> None:
    """The embedded store says state dies with the process; auth-off is warned; uvloop runs."""
    gw = GatewayProcess(tmp_path / "gw.log")
    gw.start()
    try:
        assert gw.terminate() == 0
    finally:
        log = (tmp_path / "gw.log").read_text()
    assert "store=memory: sessions live in this process only and do not survive a restart" in log
    assert "authentication is off" in log
    assert "loop=uvloop" in log
    assert "agent=demo: the demo agent runs in this process" in log


def test_json_logs_name_session_and_tenant_never_the_caller(tmp_path: Path) -> None:
    """With --log-format json every line is one JSON object; session lines carry the session
    ID and tenant as fields, and no line holds the phone number or a form answer."""
    gw = GatewayProcess(tmp_path / "gw.log", "--log-format", "json", "--downstream", "demo")
    gw.start()
    try:
        with connect(f"ws://127.0.0.1:{gw.port}/ws") as ws:
            ws.send(
                json.dumps(
                    {
                        "type": "hello",
                        "tenant": "acme",
                        "caller": {"phone": "+14155550100", "call_id": "c-json"},
                    }
                )
            )
            welcome = json.loads(ws.recv(timeout=5))
            ws.send(json.dumps({"type": "turn", "turn_id": "t1", "text": "Ada Lovelace"}))
            while json.loads(ws.recv(timeout=5))["type"] != "ack":
                pass
            ws.send(json.dumps({"type": "bye"}))
            with contextlib.suppress(ConnectionClosed):
                while True:
                    ws.recv(timeout=5)
        assert gw.terminate() == 0
    finally:
        text = (tmp_path / "gw.log").read_text()
    entries = [json.loads(line) for line in text.splitlines()]
    assert {"time", "level", "logger", "event", "message"} <= set(entries[0])
    opened = [e for e in entries if e["event"] == "session open"]
    assert opened and opened[0]["session"] == welcome["session_id"]
    assert opened[0]["tenant"] == "acme" and opened[0]["outcome"] == "miss"
    assert any(e["event"] == "session end" for e in entries)
    for secret in ("4155550100", "Ada", "Lovelace"):
        assert secret not in text


@pytest.mark.slow
def test_demo_agent_command(tmp_path: Path) -> None:
    """`hangon demo-agent` serves the demo agent until SIGTERM, then exits 0; `hangon serve`
    says which agent it relays to."""
    agent = GatewayProcess(tmp_path / "agent.log", command="demo-agent")
    agent.start()
    gw = GatewayProcess(tmp_path / "gw.log", "--downstream", f"ws://127.0.0.1:{agent.port}/")
    gw.start()
    try:
        assert gw.terminate() == 0
    finally:
        assert agent.terminate() == 0
    assert f"agent=ws://127.0.0.1:{agent.port}/" in (tmp_path / "gw.log").read_text()
    assert "demo agent listening" in (tmp_path / "agent.log").read_text()


def test_keygen_prints_keys_the_gateway_accepts(capsys: pytest.CaptureFixture[str]) -> None:
    """`hangon keygen` prints environment lines that configure a Redis gateway."""
    cli.main(["keygen", "--key-id", "k1"])
    lines = capsys.readouterr().out.splitlines()
    environ = dict(line.split("=", 1) for line in lines)
    assert set(environ) == {"HANGON_STATE_KEYS", "HANGON_CALLER_HASH_KEY"}
    config = parse(["--redis-url", "redis://127.0.0.1:1/0"], environ)
    assert [kid for kid, _ in config.security.state_keys] == ["k1"]
    assert config.security.caller_hash_key is not None
    with pytest.raises(SystemExit):
        cli.main(["keygen", "--key-id", "no spaces"])
    assert "--key-id='no spaces'" in capsys.readouterr().err


def test_redis_needs_keys_and_secrets_are_never_echoed() -> None:
    """Redis without sealing keys is refused, and a bad key's error does not repeat it."""
    with pytest.raises(ConfigError, match="HANGON_STATE_KEYS.*required with --redis-url"):
        parse(["--redis-url", "redis://127.0.0.1:1/0"], {})
    with pytest.raises(ConfigError, match="set both") as half:
        parse([], {"HANGON_STATE_KEYS": "k1:" + "A" * 43 + "="})
    assert half.value.name == "HANGON_CALLER_HASH_KEY"
    with pytest.raises(ConfigError) as bad:
        parse([], {"HANGON_STATE_KEYS": "k1:c2VjcmV0LXZhbHVl", "HANGON_CALLER_HASH_KEY": "x"})
    assert "c2VjcmV0" not in str(bad.value) and "(hidden)" in str(bad.value)


def test_log_times_as_the_standard_formatter() -> None:
    """Times formatted once per second read as logging's own, to the millisecond, in both
    formats, across second boundaries."""
    text, json_format = cli._Formatter(), cli.JsonFormatter()
    standard = logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s")
    for created in (1_796_000_000.001, 1_796_000_000.999, 1_796_000_001.0, 1_796_000_001.5):
        record = logging.LogRecord("gateway.client", logging.INFO, "", 0, "event k=v", (), None)
        record.created, record.msecs = created, (created - int(created)) * 1000
        assert text.format(record) == standard.format(record)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        entry = json.loads(json_format.format(record))
        assert entry["time"] == f"{stamp}.{int(record.msecs):03d}Z"
