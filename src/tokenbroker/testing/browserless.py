"""Drive an authorization-code login and consent without a browser.

:func:`complete_authorization` does what a person does in a browser, with one
``httpx.Client`` and its cookie jar: open the authorization URL, follow redirects on the
authorization server's origin, fill and post the login form, press a consent button, and
stop at the redirect to the client, whose URL it returns (``code``, ``state``, ``iss``)
without following it. It reads the forms from the HTML, so the pages' CSRF tokens travel
as a browser would send them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html.parser import HTMLParser
from urllib.parse import urljoin, urlsplit

import httpx

__all__ = ["AuthorizationFlowError", "complete_authorization"]

_LOGIN_NAMES = ("username", "login")


class AuthorizationFlowError(RuntimeError):
    """The pages did not lead to a redirect to the client (an error page, a loop)."""


@dataclass
class _Form:
    action: str
    fields: dict[str, str] = field(default_factory=dict)
    has_password: bool = False
    buttons: list[tuple[str, str]] = field(default_factory=list)


class _FormParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.forms: list[_Form] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {name: value or "" for name, value in attrs}
        if tag == "form":
            self.forms.append(_Form(a.get("action", "")))
            return
        if not self.forms or tag not in ("input", "button"):
            return
        form, kind, name = self.forms[-1], a.get("type", "").lower(), a.get("name", "")
        if tag == "button" or kind == "submit":
            form.buttons.append((name, a.get("value", "")))
        elif kind == "password":
            form.has_password = True
        elif name:
            form.fields[name] = a.get("value", "")


def _origin(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    return parts.scheme, parts.netloc


def _submission(form: _Form, username: str, password: str, approve: bool) -> dict[str, str]:
    data = dict(form.fields)
    if form.has_password:
        for name in _LOGIN_NAMES:
            if name in data:
                data[name] = username
        data["password"] = password
        return data
    wanted = "approve" if approve else "deny"
    named = [(name, value) for name, value in form.buttons if name]
    choice = next((b for b in named if b[1] == wanted), named[0] if named else None)
    if choice is not None:
        data[choice[0]] = choice[1]
    return data


def complete_authorization(
    authorize_url: str,
    *,
    username: str,
    password: str,
    approve: bool = True,
    client: httpx.Client | None = None,
    max_steps: int = 10,
) -> str:
    """Sign in and answer the consent page, returning the redirect to the client.

    Args:
        authorize_url: The full authorization request URL.
        username: The account to sign in with.
        password: Its password.
        approve: Press the approve button (or the deny button when False).
        client: The HTTP client whose cookie jar holds the session; a new one if omitted.
        max_steps: The most requests to make before giving up.

    Returns:
        The ``Location`` of the first redirect leaving the authorization server's origin.

    Raises:
        AuthorizationFlowError: A page was an error or had no form, or ``max_steps`` ran out.
        httpx.HTTPError: The server could not be reached.
    """
    own = client or httpx.Client(timeout=10)
    server = _origin(authorize_url)
    signed_in = False
    try:
        response = own.get(authorize_url)
        for _ in range(max_steps):
            location = response.headers.get("Location")
            if response.is_redirect and location:
                target: str = urljoin(str(response.url), location)
                if _origin(target) != server:
                    return target
                response = own.get(target)
                continue
            if response.status_code != 200:
                raise AuthorizationFlowError(
                    f"the authorization server answered {response.status_code}"
                )
            parser = _FormParser()
            parser.feed(response.text)
            if not parser.forms:
                raise AuthorizationFlowError("the page has no form to submit")
            form = parser.forms[0]
            if form.has_password and signed_in:
                raise AuthorizationFlowError("the login was refused")
            signed_in = signed_in or form.has_password
            action = urljoin(str(response.url), form.action or str(response.url))
            response = own.post(action, data=_submission(form, username, password, approve))
        raise AuthorizationFlowError(f"no redirect to the client after {max_steps} steps")
    finally:
        if client is None:
            own.close()
