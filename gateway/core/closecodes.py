"""WebSocket close codes used by the gateway and what a client should do on each.

Ranges (same split as centrifuge ``disconnect.go``):

* 1000-2999: RFC 6455 section 7.4.1 codes.
* 4000-4499: application codes after which the client should reconnect and resume.
* 4500-4999: application codes after which the client must not reconnect as is.

A close reason is at most 123 UTF-8 bytes (RFC 6455 section 5.5: control frame
payloads are at most 125 bytes, two of which carry the code).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

__all__ = [
    "BYE",
    "INTERNAL_ERROR",
    "INVALID_PAYLOAD",
    "MESSAGE_TOO_BIG",
    "OVERLOADED",
    "HELLO_TIMEOUT",
    "POLICY_VIOLATION",
    "RATE_LIMITED",
    "RESUME_REFUSED",
    "SERVICE_RESTART",
    "SESSION_CONFLICT",
    "SESSION_ENDED",
    "SESSION_REPLACED",
    "SLOW_CONSUMER",
    "STATE_TOO_BIG",
    "STORE_UNAVAILABLE",
    "UNSUPPORTED_DATA",
    "CloseReason",
    "ERRORS",
    "ErrorCode",
]


@dataclass(frozen=True, slots=True)
class CloseReason:
    """A close code, its reason text and whether the client should reconnect."""

    code: int
    reason: str
    reconnect: bool

    def __post_init__(self) -> None:
        if len(self.reason.encode()) > 123:
            raise ValueError(f"close reason longer than 123 bytes: {self.reason!r}")
        if 4000 <= self.code <= 4499 and not self.reconnect:
            raise ValueError(f"code {self.code} is in the retryable range")
        if 4500 <= self.code <= 4999 and self.reconnect:
            raise ValueError(f"code {self.code} is in the terminal range")


class ErrorCode(enum.StrEnum):
    """The ``code`` of an ``error`` frame (and of a ``nack``); :data:`ERRORS` maps each to
    the close that follows it. A :class:`str`, so it compares equal to the code's text and
    serves as a metrics label as is."""

    INVALID_JSON = "invalid_json"
    INVALID_MESSAGE = "invalid_message"
    UNSUPPORTED_DATA = "unsupported_data"
    MESSAGE_TOO_BIG = "message_too_big"
    STATE_TOO_BIG = "state_too_big"
    UNKNOWN_TYPE = "unknown_type"
    UNEXPECTED_MESSAGE = "unexpected_message"
    INVALID_CALLER = "invalid_caller"
    AUTH_FAILED = "auth_failed"
    TOKEN_EXPIRED = "token_expired"
    RESUME_REFUSED = "resume_refused"
    SESSION_ENDED = "session_ended"
    SESSION_REPLACED = "session_replaced"
    SESSION_CONFLICT = "session_conflict"
    STORE_UNAVAILABLE = "store_unavailable"
    OVERLOADED = "overloaded"
    TENANT_LIMIT = "tenant_limit"
    RATE_LIMITED = "rate_limited"
    SLOW_CONSUMER = "slow_consumer"
    HELLO_TIMEOUT = "hello_timeout"
    INTERNAL_ERROR = "internal_error"


BYE = CloseReason(1000, "bye", reconnect=False)
"""The client said ``bye``; the session has ended."""
UNSUPPORTED_DATA = CloseReason(1003, "binary frames are not accepted", reconnect=False)
"""RFC 6455 7.4.1: the endpoint cannot accept this data type (a binary frame)."""
INVALID_PAYLOAD = CloseReason(1007, "invalid payload", reconnect=False)
"""RFC 6455 7.4.1: the frame is not valid JSON or not a well-formed protocol message."""
POLICY_VIOLATION = CloseReason(1008, "policy violation", reconnect=False)
"""RFC 6455 7.4.1: a well-formed message that is not allowed (unknown type, wrong order)."""
MESSAGE_TOO_BIG = CloseReason(1009, "message too big", reconnect=False)
"""RFC 6455 7.4.1: the frame is larger than ``--max-message-size``."""
STATE_TOO_BIG = CloseReason(1009, "session state too big", reconnect=False)
"""RFC 6455 7.4.1: the turn would grow the session state past ``--max-state-size``."""
INTERNAL_ERROR = CloseReason(1011, "internal error", reconnect=True)
"""RFC 6455 7.4.1: an unexpected condition on the gateway; resume on reconnect."""
SERVICE_RESTART = CloseReason(1012, "service restart", reconnect=True)
"""The gateway is draining for a restart; reconnect (to any instance) and resume."""
OVERLOADED = CloseReason(1013, "try again later", reconnect=True)
"""RFC 6455 7.4.1: too many hellos wait already; reconnect after the error's ``retry_after``."""

STORE_UNAVAILABLE = CloseReason(4001, "session store unavailable", reconnect=True)
"""The session store stayed unreachable through every retry; reconnect later."""
SESSION_CONFLICT = CloseReason(4003, "session moved on; reconnect to resume", reconnect=True)
"""The stored session changed under this connection; reconnect to load the newest state."""
HELLO_TIMEOUT = CloseReason(4002, "no hello in time", reconnect=True)
"""The connection sent no ``hello`` within ``--hello-timeout``; reconnect and say hello."""
RATE_LIMITED = CloseReason(4008, "too many turns", reconnect=True)
"""The client sent turns faster than ``--max-turns-per-second`` allows; reconnect after the
error's ``retry_after`` and resume (unacknowledged turns are re-sent, and deduplicated)."""
SLOW_CONSUMER = CloseReason(4009, "not reading", reconnect=True)
"""The client stopped reading: a frame waited ``--send-timeout`` seconds to be taken, or
more than ``--max-send-queue`` bytes waited for it. Reconnect and resume; what was not
delivered is replayed. A peer that reads nothing sees a reset connection (1006) instead:
it cannot read the close frame either."""

SESSION_REPLACED = CloseReason(4500, "session replaced by a newer connection", reconnect=False)
"""Another connection resumed this session; this one is stale and must not come back."""
RESUME_REFUSED = CloseReason(4501, "resume token refused", reconnect=False)
"""The hello named a live session but carried the wrong resume token."""
SESSION_ENDED = CloseReason(4502, "session ended", reconnect=False)
"""The session for this caller key ended with ``bye``; a new call needs a new call ID."""


ERRORS: Final[Mapping[ErrorCode, CloseReason]] = {
    ErrorCode.INVALID_JSON: INVALID_PAYLOAD,
    ErrorCode.INVALID_MESSAGE: INVALID_PAYLOAD,
    ErrorCode.UNSUPPORTED_DATA: UNSUPPORTED_DATA,
    ErrorCode.MESSAGE_TOO_BIG: MESSAGE_TOO_BIG,
    ErrorCode.STATE_TOO_BIG: STATE_TOO_BIG,
    ErrorCode.UNKNOWN_TYPE: POLICY_VIOLATION,
    ErrorCode.UNEXPECTED_MESSAGE: POLICY_VIOLATION,
    ErrorCode.INVALID_CALLER: POLICY_VIOLATION,
    ErrorCode.AUTH_FAILED: POLICY_VIOLATION,
    ErrorCode.TOKEN_EXPIRED: POLICY_VIOLATION,
    ErrorCode.RESUME_REFUSED: RESUME_REFUSED,
    ErrorCode.SESSION_ENDED: SESSION_ENDED,
    ErrorCode.SESSION_REPLACED: SESSION_REPLACED,
    ErrorCode.SESSION_CONFLICT: SESSION_CONFLICT,
    ErrorCode.STORE_UNAVAILABLE: STORE_UNAVAILABLE,
    ErrorCode.OVERLOADED: OVERLOADED,
    ErrorCode.TENANT_LIMIT: OVERLOADED,
    ErrorCode.RATE_LIMITED: RATE_LIMITED,
    ErrorCode.SLOW_CONSUMER: SLOW_CONSUMER,
    ErrorCode.HELLO_TIMEOUT: HELLO_TIMEOUT,
    ErrorCode.INTERNAL_ERROR: INTERNAL_ERROR,
}
"""Every error code an ``error`` frame may carry, and the close that follows it."""
