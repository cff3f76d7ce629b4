"""Every hostile case also checks the gateway's log: no traceback, nothing at ERROR."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.ERROR or record.exc_info:
            self.records.append(record)


@pytest.fixture(autouse=True)
def clean_log() -> Iterator[None]:
    """Fail the case if the gateway logged an error or a traceback."""
    handler = _Records()
    logger = logging.getLogger("gateway")
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
    assert not handler.records, "\n".join(handler.format(r) for r in handler.records)
