"""hangon: a WebSocket reconnect gateway for voice sessions."""

from gateway.config import Config
from gateway.exceptions import (
    ConfigError,
    GatewayError,
    StoreConflict,
    StoreError,
    StoreTimeout,
    StoreUnavailable,
)

__all__ = [
    "Config",
    "ConfigError",
    "GatewayError",
    "StoreConflict",
    "StoreError",
    "StoreTimeout",
    "StoreUnavailable",
    "__version__",
]

__version__ = "0.1.0"
