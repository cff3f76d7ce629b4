"""The core stays free of I/O libraries."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import gateway.core

FORBIDDEN = {"asyncio", "websockets", "redis", "prometheus_client", "uvloop", "socket"}


def test_core_imports_no_io_library() -> None:
    """No module in gateway/core imports asyncio, websockets, redis, prometheus_client or uvloop."""
    core = Path(gateway.core.__file__).parent
    found = []
    for path in sorted(core.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            else:
                continue
            found += [(path.name, n) for n in names if n.split(".")[0] in FORBIDDEN]
    assert found == []
    assert len(list(core.glob("*.py"))) >= 8


def test_only_codec_imports_orjson() -> None:
    """orjson is imported by core/codec.py alone."""
    root = Path(gateway.core.__file__).parent.parent
    users = sorted(
        str(p.relative_to(root)) for p in root.rglob("*.py") if "import orjson" in p.read_text()
    )
    assert users == ["core/codec.py"]


def test_exceptions_import_only_the_standard_library() -> None:
    """gateway/exceptions.py, which the core imports, imports nothing outside the stdlib."""
    path = Path(gateway.core.__file__).parent.parent / "exceptions.py"
    imported = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= sys.stdlib_module_names
