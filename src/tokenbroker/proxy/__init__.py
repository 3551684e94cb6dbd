"""The token-injecting reverse proxy (``tokenbroker proxy``, DESIGN §1 problem 4).

Routes by path prefix to upstreams, replacing any client ``Authorization`` with a
token: in ``pool`` mode each client TCP connection leases one account of a login
provider for its whole life; in ``shared`` mode every request gets the provider's
current token. Built on ``asyncio.Protocol`` and httptools (llhttp) for
connection-level control; run it on uvloop.
"""

from . import admission, connection, exchange, http, upstream
from .server import ProxyServer

__all__ = ["ProxyServer", "compiled"]


def compiled() -> bool:
    """True when the per-request modules run compiled by mypyc (a wheel built with
    ``make compiled``; see ``hatch_build.py``), False for the pure-Python sources."""
    return all(
        not (module.__file__ or ".py").endswith(".py")
        for module in (admission, connection, exchange, http, upstream)
    )
