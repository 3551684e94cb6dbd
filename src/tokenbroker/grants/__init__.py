"""Grants: sans-I/O token requests and reply parsing, the retry flow, its driver, grant kinds.

``base`` holds what every grant shares (client authentication, RFC 6749 §5 reply
parsing); ``client_credentials``, ``refresh_token`` and ``login`` are the grants;
``kinds`` has one :class:`GrantKind` per provider settings type; ``flow`` is the retry
policy as a generator; ``send`` is the driver that does the I/O.
"""

from __future__ import annotations

from .base import (
    KNOWN_ERROR_CODES,
    Grant,
    Reply,
    TokenResponse,
    basic_authorization,
    retry_after,
    token_at,
    validate_token_value,
)

# The template helpers delegation.py shares (re-exported, not public).
from .base import _dig as _dig
from .base import _fill as _fill
from .client_credentials import ClientCredentialsGrant
from .flow import Exchange, RetryPolicy, Sleep, token_flow
from .kinds import KINDS, GrantKind, kind_of
from .login import LoginGrant
from .refresh_token import RefreshTokenGrant
from .send import send_sync, transport_error

__all__ = [
    "KINDS",
    "KNOWN_ERROR_CODES",
    "ClientCredentialsGrant",
    "Exchange",
    "Grant",
    "GrantKind",
    "LoginGrant",
    "RefreshTokenGrant",
    "Reply",
    "RetryPolicy",
    "Sleep",
    "TokenResponse",
    "basic_authorization",
    "kind_of",
    "retry_after",
    "send_sync",
    "token_at",
    "token_flow",
    "transport_error",
    "validate_token_value",
]
