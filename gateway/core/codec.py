"""JSON encoding and decoding; the only module that imports orjson."""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DecodeError", "dumps", "loads"]

DecodeError = orjson.JSONDecodeError
"""Raised by :func:`loads` on malformed JSON (a subclass of :class:`ValueError`)."""


def dumps(obj: Any) -> bytes:
    """Serialise ``obj`` to compact UTF-8 JSON.

    Args:
        obj: Any JSON-compatible value; dict keys must be strings.

    Returns:
        The encoded bytes, ready to be sent as a text frame or stored.
    """
    return orjson.dumps(obj)


def loads(data: str | bytes) -> Any:
    """Parse JSON text.

    Raises:
        DecodeError: If ``data`` is not valid JSON or not valid UTF-8.
    """
    return orjson.loads(data)
