"""The docs name every option, error code and metric the code has."""

from __future__ import annotations

from pathlib import Path

from gateway.config import OPTIONS
from gateway.core.protocol import ERRORS
from gateway.metrics import Metrics

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
