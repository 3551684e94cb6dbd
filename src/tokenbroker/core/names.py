"""The shapes of names and codes, defined once.

Provider and consumer names appear in config keys, URLs, API paths, consumer ``allow``
rules and metric labels; the same pattern must hold everywhere, or a name the config
accepts could not be asked for (or the reverse). Error codes come in two shapes: the
OAuth ``error`` a provider sends (RFC 6749 §5.2's character set, checked before it is
shown) and the broker's own ``error.code`` (snake case).
"""

from __future__ import annotations

import re

__all__ = [
    "BROKER_ERROR_CODE",
    "CONSUMER_NAME",
    "CONSUMER_NAME_PATTERN",
    "OAUTH_ERROR_CODE",
    "PROVIDER_NAME",
    "PROVIDER_NAME_PATTERN",
]

#: A provider name, unanchored (for embedding in larger patterns).
PROVIDER_NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
#: A whole provider name.
PROVIDER_NAME = re.compile(PROVIDER_NAME_PATTERN + r"\Z")
#: A consumer name, unanchored.
CONSUMER_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}"
#: A whole consumer name.
CONSUMER_NAME = re.compile(CONSUMER_NAME_PATTERN + r"\Z")
#: A provider's OAuth ``error`` value: RFC 6749 §5.2 NQSCHAR (%x20-21 / %x23-5B / %x5D-7E).
OAUTH_ERROR_CODE = re.compile(r"[\x20\x21\x23-\x5b\x5d-\x7e]{1,64}\Z")
#: The broker's own ``error.code`` in an error body (see :mod:`tokenbroker.edge.statuses`).
BROKER_ERROR_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")
