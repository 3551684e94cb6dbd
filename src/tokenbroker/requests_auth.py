"""A ``requests`` auth that attaches a broker's token; on a 401 it invalidates and retries once.

Imported only by :meth:`tokenbroker.Broker.requests_auth`, so ``requests`` stays optional.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase

from .auth import TokenSource

__all__ = ["RequestsBrokerAuth"]


class RequestsBrokerAuth(AuthBase):
    """Bearer auth for ``requests`` from a :class:`~tokenbroker.auth.TokenSource`.

    Args:
        source: Where tokens come from.
        provider: The provider name.
        scope: Optional scope.
        account: Optional account (login providers).
    """

    def __init__(
        self,
        source: TokenSource,
        provider: str,
        scope: str | None = None,
        *,
        account: str | None = None,
    ) -> None:
        self._source = source
        self._provider = provider
        self._scope = scope
        self._account = account

    def __repr__(self) -> str:
        return f"RequestsBrokerAuth(provider={self._provider!r}, scope={self._scope!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Attach the current token and a hook that handles one 401."""
        token = self._source.get_token(self._provider, self._scope, account=self._account)
        request.headers["Authorization"] = token.authorization
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        body = request.body
        if response.status_code != 401 or not (body is None or isinstance(body, bytes | str)):
            return response
        sent = str(request.headers.get("Authorization", "")).partition(" ")[2]
        self._source.invalidate(self._provider, sent, self._scope, account=self._account)
        token = self._source.get_token(self._provider, self._scope, account=self._account)
        response.content  # noqa: B018 - drain the body so the connection can be reused
        response.close()
        retry = request.copy()
        retry.headers["Authorization"] = token.authorization
        retry.hooks = {"response": []}
        adapter = response.connection
        again: requests.Response = adapter.send(retry, **kwargs)
        again.history.append(response)
        again.request = retry
        return again
