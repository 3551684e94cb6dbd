"""The job kinds, one small module each, and the registry the service looks kinds up in.

=============  ===============================================  ==========
kind           what it does                                     idempotent
=============  ===============================================  ==========
``warm``       obtain every account's / scope's token            yes
``refresh``    force a new token for every key of a provider      no
``rotate_key`` re-encrypt the store under the primary key         yes
``keepalive``  refresh idle-expiring refresh tokens in time       yes
``authorize``  a person re-authorises a refresh-token provider    no
=============  ===============================================  ==========
"""

from __future__ import annotations

from ...errors import UnknownJobKindError
from .authorize import Authorize
from .base import JobKind, KindContext
from .keepalive import Keepalive
from .refresh import Refresh
from .rotate_key import RotateKey
from .warm import Warm

__all__ = ["KINDS", "JobKind", "KindContext", "kind_for"]

#: Every job kind by name.
KINDS: dict[str, JobKind] = {
    k.name: k for k in (Warm(), Refresh(), RotateKey(), Keepalive(), Authorize())
}


def kind_for(name: object) -> JobKind:
    """The kind called ``name``.

    Raises:
        UnknownJobKindError: Listing the kinds there are.
    """
    kind = KINDS.get(name) if isinstance(name, str) else None
    if kind is None:
        raise UnknownJobKindError(f"unknown job kind; kinds: {', '.join(sorted(KINDS))}")
    return kind
