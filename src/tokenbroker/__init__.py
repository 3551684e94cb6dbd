"""tokenbroker: the one place a company keeps its upstream API credentials.

The library API is re-exported here. Server parts (HTTP API, metrics, CLI)
are separate sub-modules and are never imported by ``import tokenbroker``.
"""

import logging as _logging

from .client.httpx_auth import BrokerAuth
from .client.remote import BrokerClient
from .config import Settings, load_settings, parse_settings
from .core.clock import Clock, ManualClock, SystemClock
from .core.events import (
    Event,
    EventBus,
    LeaseGranted,
    RefreshTokenRotated,
    TokenAcquired,
    TokenInvalidated,
    TokenRequestFailed,
)
from .core.secret import Secret
from .core.token import Token
from .engine.broker import Broker
from .engine.cache import SlotState, Timing, TokenCache
from .errors import (
    ClientAuthenticationError,
    ConfigError,
    ConfigProblem,
    EncryptionKeyError,
    InvalidScopeError,
    InvalidTokenError,
    LeaseExpiredError,
    PoolExhaustedError,
    ProviderError,
    ProviderMisconfiguredError,
    ProviderUnavailableError,
    ReauthorizationRequiredError,
    StoreCorruptError,
    StoreError,
    TokenBrokerError,
    TooManyScopesError,
    UnknownProviderError,
)
from .store import Store

__version__ = "0.1.0"

# A library never configures handlers (STYLE 9); this one keeps Python's fallback
# handler from printing the library's warnings to stderr when the program set up none.
_logging.getLogger("tokenbroker").addHandler(_logging.NullHandler())

__all__ = [
    "Broker",
    "BrokerAuth",
    "BrokerClient",
    "ClientAuthenticationError",
    "Clock",
    "ConfigError",
    "ConfigProblem",
    "EncryptionKeyError",
    "Event",
    "EventBus",
    "InvalidScopeError",
    "InvalidTokenError",
    "LeaseExpiredError",
    "LeaseGranted",
    "ManualClock",
    "PoolExhaustedError",
    "ProviderError",
    "ProviderMisconfiguredError",
    "ProviderUnavailableError",
    "ReauthorizationRequiredError",
    "RefreshTokenRotated",
    "Secret",
    "Settings",
    "SlotState",
    "Store",
    "StoreCorruptError",
    "StoreError",
    "SystemClock",
    "Timing",
    "Token",
    "TokenAcquired",
    "TokenBrokerError",
    "TokenCache",
    "TokenInvalidated",
    "TokenRequestFailed",
    "TooManyScopesError",
    "UnknownProviderError",
    "__version__",
    "load_settings",
    "parse_settings",
]
