"""hangon: a WebSocket reconnect gateway for voice sessions."""

from gateway.config import Config
from gateway.core.agent import InvalidAgentFrame
from gateway.core.auth import AuthError
from gateway.core.callerkey import InvalidCaller
from gateway.core.sealing import Unsealable
from gateway.exceptions import (
    ClientClosed,
    ConfigError,
    GatewayError,
    InvalidInput,
    StoreConflict,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)

__all__ = [
    "AuthError",
    "ClientClosed",
    "Config",
    "ConfigError",
    "GatewayError",
    "InvalidAgentFrame",
    "InvalidCaller",
    "InvalidInput",
    "StoreConflict",
    "StoreError",
    "StoreTimeout",
    "StoreUnavailable",
    "Unsealable",
    "__version__",
]

__version__ = "0.1.0"
