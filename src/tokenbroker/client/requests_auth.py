"""A ``requests`` auth that attaches a broker's token; on a 401 it invalidates and retries once.

Imported only by :meth:`tokenbroker.Broker.requests_auth`, so ``requests`` stays optional.
"""

from __future__ import annotations

from typing import Any

import requests
from requests.auth import AuthBase

from .target import TokenTarget

__all__ = ["RequestsBrokerAuth"]


class RequestsBrokerAuth(AuthBase):
    """Bearer auth for ``requests`` from a :class:`~tokenbroker.client.httpx_auth.TokenTarget`.

    Args:
        target: The provider key to get tokens for.
    """

    def __init__(self, target: TokenTarget) -> None:
        self.target = target

    def __repr__(self) -> str:
        return f"RequestsBrokerAuth({self.target!r})"

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        """Attach the current token and a hook that handles one 401."""
        token = self.target.get()
        request.headers["Authorization"] = token.authorization
        request.register_hook("response", self._on_response)  # type: ignore[no-untyped-call]
        return request

    def _on_response(self, response: requests.Response, **kwargs: Any) -> requests.Response:
        request = response.request
        body = request.body
        if response.status_code != 401 or not (body is None or isinstance(body, bytes | str)):
            return response
        sent = str(request.headers.get("Authorization", "")).partition(" ")[2]
        self.target.invalidate(sent)
        token = self.target.get()
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
