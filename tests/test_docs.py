"""The docs name every option, error code and metric the code has, and only code that exists."""

from __future__ import annotations

import asyncio
import builtins
import json
import keyword
import re
import sys
from pathlib import Path

from gateway.config import OPTIONS, Config
from gateway.core.lifecycle import Lifecycle, Phase
from gateway.core.protocol import ERRORS
from gateway.metrics import Metrics
from tests.support.gateways import GatewayFactory

DOCS = Path(__file__).parent.parent / "docs"


def test_configuration_lists_every_option() -> None:
    """docs/configuration.md has every flag and variable."""
    text = (DOCS / "configuration.md").read_text()
    missing = [o.flag for o in OPTIONS if o.flag not in text or o.env not in text]
    assert missing == []


def test_protocol_lists_every_error_code() -> None:
    """docs/protocol.md has every error code and its close code."""
    text = (DOCS / "protocol.md").read_text()
    missing = [code for code, reason in ERRORS.items() if f"`{code}`" not in text]
    assert missing == []
    assert all(str(reason.code) in text for reason in ERRORS.values())


def test_operations_lists_every_metric() -> None:
    """docs/operations.md has every metric family."""
    text = (DOCS / "operations.md").read_text()
    names = {m.name for m in Metrics().registry.collect()}
    missing = sorted(n for n in names if n not in text)
    assert missing == []


ROOT = DOCS.parent
GATEWAY = ROOT / "gateway"
_SPAN = re.compile(r"`([^`\n]+)`")
_NAME = re.compile(r"[A-Z][A-Za-z0-9]*[a-z][A-Za-z0-9]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?")
"""``Class`` or ``Class.member``: CamelCase first, so constants and config fields are left
out."""


def _defines(text: str, name: str) -> bool:
    """Whether ``text`` defines ``name``: a class, a function, an assignment or a field."""
    pattern = rf"^\s*(?:(?:async\s+)?def|class)\s+{name}\b|^\s*(?:self\.)?{name}\s*[:=]"
    return re.search(pattern, text, re.MULTILINE) is not None


def _missing_files(spans: list[str]) -> list[str]:
    """The file names among ``spans`` that do not exist: a path from the checkout's root,
    or a bare file name anywhere under gateway/."""
    names = {p.name for p in GATEWAY.rglob("*") if p.is_file()}
    missing = []
    for span in spans:
        if not span.endswith((".py", ".lua", ".md")):
            continue
        found = (ROOT / span).exists() if "/" in span else span in names
        if not found:
            missing.append(span)
    return missing


def _missing_names(spans: list[str]) -> list[str]:
    """The ``Class`` and ``Class.member`` names among ``spans`` that gateway/ does not define."""
    sources = [p.read_text() for p in GATEWAY.rglob("*.py")]
    missing = []
    for span in spans:
        if not _NAME.fullmatch(span):
            continue
        cls, _, member = span.partition(".")
        if keyword.iskeyword(cls) or hasattr(builtins, cls):
            continue
        homes = [text for text in sources if re.search(rf"^class {cls}\b", text, re.MULTILINE)]
        if not homes or (member and not any(_defines(text, member) for text in homes)):
            missing.append(span)
    return missing


def test_architecture_names_only_what_exists() -> None:
    """Every file, class and Class.member that docs/architecture.md names exists."""
    spans = _SPAN.findall((DOCS / "architecture.md").read_text())
    assert _missing_files(spans) + _missing_names(spans) == []


def test_architecture_table_names_live_in_their_modules() -> None:
    """Each name in the table of concerns is defined in one of the modules of its row."""
    text = (DOCS / "architecture.md").read_text()
    missing = []
    rows = [line.split("|")[1:-1] for line in text.splitlines() if line.startswith("| ")]
    for _, modules, names in rows[1:]:
        files, folder = [], GATEWAY
        for path in _SPAN.findall(modules):
            if "/" in path:
                folder = (ROOT / path).parent
            files.append((folder / Path(path).name).read_text())
        for name in _SPAN.findall(names):
            if not any(_defines(source, name) for source in files):
                missing.append(name)
    assert len(rows) > 20
    assert missing == []


def test_architecture_diagram_has_every_phase() -> None:
    """The lifecycle diagram's states are Lifecycle's phases, its arrows Lifecycle's methods."""
    text = (DOCS / "architecture.md").read_text()
    diagram = text.split("stateDiagram-v2", 1)[1].split("```", 1)[0]
    arrows = re.findall(r"(\S+) --> ([^\s:]+)(?::\s*(\w+))?", diagram)
    states = {state for a, b, _ in arrows for state in (a, b)} - {"[*]"}
    assert states == {phase.name for phase in Phase}
    methods = {method for _, _, method in arrows if method}
    assert [m for m in sorted(methods) if not callable(getattr(Lifecycle, m, None))] == []
    assert methods >= {"attach", "open_degraded", "detach", "linger_over", "drain", "drop", "end"}


async def test_readme_example_runs_as_printed_twice(
    make_gateway: GatewayFactory, config: Config
) -> None:
    """The README's client example, against the demo agent: it prints what its comments say,
    and a second run is a new call, not a hang on a resumed one."""
    text = (DOCS.parent / "README.md").read_text()
    code = re.search(r"```python\n(import asyncio, json.*?)```", text, re.S)
    assert code is not None
    async with make_gateway(config.replace("agent", downstream="demo")) as gw:
        example = code.group(1).replace("127.0.0.1:8765", f"127.0.0.1:{gw.port}")
        for _ in range(2):
            run = await asyncio.create_subprocess_exec(
                sys.executable, "-c", example, stdout=asyncio.subprocess.PIPE
            )
            out, _ = await asyncio.wait_for(run.communicate(), 30)
            assert run.returncode == 0
            lines = out.decode().splitlines()
            assert "What name" in lines[0] and lines[-1] == "{'name': 'Ada'}"
            assert [json.loads(line)["type"] for line in lines[1:4]] == ["ack", "state", "msg"]
