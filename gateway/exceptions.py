"""Exceptions raised by hangon.

The tree::

    GatewayError
    ├── ConfigError          a setting has a bad value; names the setting
    ├── ClientClosed         gateway.client stopped: a close that forbids resuming, or given up
    ├── StoreError           the session store failed an operation
    │   ├── StoreUnavailable the store could not be reached (retryable)
    │   ├── StoreTimeout     the store did not answer in time (retryable)
    │   └── StoreConflict    the stored session moved on: another writer, expiry or replacement
    ├── InvalidInput         a peer sent something the gateway refuses, checked where it entered
    │   ├── InvalidCaller    a caller object is malformed       (gateway.core.callerkey; ValueError)
    │   ├── InvalidAgentFrame  the voice agent sent a bad frame (gateway.core.agent; ValueError)
    │   └── AuthError        a client token was refused         (gateway.core.auth)
    └── Unsealable           a sealed blob does not open        (gateway.core.sealing; ValueError)

The core's exceptions are defined beside the code that raises them and
importable from there; the ones that were :class:`ValueError` before they
joined the tree still are.

Protocol errors made by clients are not exceptions: :mod:`gateway.core.protocol`
records them and queues an error frame and a close instead.

This module imports nothing but the standard library, so that the sans-I/O
core can import it.
"""

from __future__ import annotations

__all__ = [
    "ClientClosed",
    "ConfigError",
    "GatewayError",
    "InvalidInput",
    "StoreConflict",
    "StoreError",
    "StoreTimeout",
    "StoreUnavailable",
]


class GatewayError(Exception):
    """Root of every exception hangon raises."""


class InvalidInput(GatewayError):
    """Something a peer sent (a client, a phone stream, the voice agent) was refused where
    it entered the gateway.

    Args:
        code: What was wrong, from the closed set of the subclass (an error code, an auth
            failure's reason, the caller field at fault).
        message: Why, for the peer and the log.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class ClientClosed(GatewayError):
    """:class:`gateway.client.Client` stopped and will not reconnect.

    Args:
        code: The close code that forbids resuming (4500-4999, 1000 after ``bye``, a
            protocol error), or ``None`` when no connection could be made.
        reason: The close reason, or why the client gave up.
    """

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(code, reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return f"closed with {self.code}: {self.reason}" if self.code else self.reason


class ConfigError(GatewayError):
    """A configuration value is invalid.

    Args:
        name: The setting, as the user wrote it (``HANGON_TTL`` or ``--ttl``).
        value: The offending value.
        problem: What is wrong with it.
    """

    def __init__(self, name: str, value: object, problem: str) -> None:
        super().__init__(name, value, problem)
        self.name = name
        self.value = value
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.name}={self.value!r}: {self.problem}"


class StoreError(GatewayError):
    """A session store operation failed.

    Args:
        op: The store operation (``restore``, ``write_turn``, ``end``, ``touch``, ``ping``).
        detail: What went wrong.
    """

    retryable = False

    def __init__(self, op: str, detail: str) -> None:
        super().__init__(op, detail)
        self.op = op
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.op}: {self.detail}"


class StoreUnavailable(StoreError):
    """The store could not be reached; the operation may be retried."""

    retryable = True


class StoreTimeout(StoreError):
    """The store did not answer in time; the operation may be retried."""

    retryable = True


class StoreConflict(StoreError):
    """The stored session is no longer the one this connection holds.

    Raised when a write finds a newer version, a different session ID (the old
    one expired or went stale and was replaced) or no session at all.
    """
