"""Using tokens: :class:`BrokerClient` against a remote broker, and the httpx and
requests adapters that put a broker's (local or remote) token on outgoing requests."""

from .httpx_auth import BrokerAuth
from .remote import BrokerClient

__all__ = ["BrokerAuth", "BrokerClient"]
