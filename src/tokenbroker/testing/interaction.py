"""The authorization endpoint and its login and consent interaction (RFC 6749 §4.1.1-§4.1.2).

:class:`AuthorizationEndpoint` validates ``GET /authorize`` with authlib (client,
exact redirect URI, response type, scope, PKCE ``S256``), then leads the user agent
through plain HTML forms (:mod:`~tokenbroker.testing.pages`)::

    GET  /authorize?...            303 -> /interaction?uid=U (sets the session cookie)
    GET  /interaction?uid=U        the login page, or the consent page once signed in
    POST /interaction/login        303 -> /interaction?uid=U (new session id)
    POST /interaction/consent      302 -> redirect_uri?code&state&iss (or error=access_denied)

A session cookie (``HttpOnly; SameSite=Lax``) carries the login between pages; every form
carries the session's CSRF token. A request whose client or redirect URI cannot be trusted
gets the server's own error page, never a redirect (RFC 6749 §4.1.2.1); every redirect to
the client carries ``iss`` (RFC 9207).
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from urllib.parse import quote

from authlib.common.urls import add_params_to_uri
from authlib.oauth2.base import OAuth2Error

from tokenbroker.testing.messages import Reply, Request
from tokenbroker.testing.pages import consent_page, error_page, login_page
from tokenbroker.testing.protocol import OAuth2Server

from .models import equal_secrets

__all__ = [
    "AUTHORIZE_PATH",
    "CONSENT_PATH",
    "INTERACTION_PATH",
    "LOGIN_FORM_PATH",
    "SESSION_COOKIE",
    "AuthorizationEndpoint",
]

AUTHORIZE_PATH = "/authorize"
INTERACTION_PATH = "/interaction"
LOGIN_FORM_PATH = "/interaction/login"
CONSENT_PATH = "/interaction/consent"
SESSION_COOKIE = "tb_authserver_session"


@dataclass(eq=False)
class _Session:
    id: str = field(repr=False)
    csrf: str = field(repr=False)
    user: str | None = None


@dataclass(eq=False)
class _Interaction:
    uid: str
    session_id: str = field(repr=False)
    request: Request = field(repr=False)
    expires_at: float
    signed_in: bool = False


class AuthorizationEndpoint:
    """The authorization endpoint, its sessions and pending interactions. Thread-safe."""

    def __init__(
        self,
        oauth: OAuth2Server,
        *,
        issuer: Callable[[], str],
        interaction_ttl_seconds: float = 600,
    ) -> None:
        """Create an endpoint with no sessions.

        Args:
            oauth: Validates requests, issues codes, checks accounts.
            issuer: Returns the issuer identifier sent as ``iss``.
            interaction_ttl_seconds: How long a started login/consent may take.
        """
        self._oauth = oauth
        self._issuer = issuer
        self._ttl = interaction_ttl_seconds
        self._lock = threading.Lock()
        self._sessions: dict[str, _Session] = {}
        self._interactions: dict[str, _Interaction] = {}
        self._forged_iss: list[str] = []
        self._denials = 0

    # -- test hooks ----------------------------------------------------------------------

    def forge_next_iss(self, issuer: str) -> None:
        """Make the next redirect to a client carry ``iss=issuer`` (a mix-up attack).

        Args:
            issuer: The forged value.
        """
        with self._lock:
            self._forged_iss.append(issuer)

    def deny_next_consent(self) -> None:
        """Treat the next consent submission as a denial, whichever button was pressed."""
        with self._lock:
            self._denials += 1

    @property
    def authorizations(self) -> int:
        """Authorization codes issued (consents approved) so far; code exchanges are the
        server's ``count("authorization_code")``."""
        issued: int = self._oauth.codes.issued
        return issued

    def routes(self) -> dict[str, tuple[str, Callable[[Request], Reply]]]:
        """The paths this endpoint serves.

        Returns:
            Path to ``(method, handler)``.
        """
        return {
            AUTHORIZE_PATH: ("GET", self.authorize),
            INTERACTION_PATH: ("GET", self.interaction),
            LOGIN_FORM_PATH: ("POST", self.login),
            CONSENT_PATH: ("POST", self.consent),
        }

    # -- pages ---------------------------------------------------------------------------

    def authorize(self, request: Request) -> Reply:
        """Serve ``GET /authorize``: validate, then start a login/consent interaction.

        Args:
            request: The authorization request.

        Returns:
            303 to the interaction page; a 302 error to a trusted redirect URI; or the
            server's error page.
        """
        try:
            grant = self._oauth.get_consent_grant(request)
        except OAuth2Error as error:
            return self._error(error)
        prompt = str(grant.request.payload.data.get("prompt") or "").split()
        if "none" in prompt:
            # No interaction is allowed, and this server always asks for consent.
            state = grant.request.payload.state
            refusal = OAuth2Error(
                error="consent_required", redirect_uri=grant.redirect_uri, state=state
            )
            return self._error(refusal)
        session, cookie = self._session_for(request)
        interaction = _Interaction(
            uid=secrets.token_urlsafe(16),
            session_id=session.id,
            request=request,
            expires_at=self._oauth.codes.clock() + self._ttl,
            signed_in=session.user is not None and "login" not in prompt,
        )
        with self._lock:
            self._interactions[interaction.uid] = interaction
        return self._see_other(interaction.uid, cookie)

    def interaction(self, request: Request) -> Reply:
        """Serve ``GET /interaction?uid=…``: the login page, or the consent page.

        Args:
            request: The page request, with the session cookie.

        Returns:
            The page, or the error page for a missing session or unknown interaction.
        """
        uid = request.query.get("uid", [""])[0]
        found = self._find(request, uid)
        if isinstance(found, Reply):
            return found
        session, interaction = found
        if not interaction.signed_in or session.user is None:
            return self._login_page(interaction, session)
        return self._consent_page(interaction, session, session.user)

    def login(self, request: Request) -> Reply:
        """Serve ``POST /interaction/login``: check the CSRF token and the account.

        Args:
            request: The login form submission.

        Returns:
            303 back to the interaction (with a new session id) when the account matches,
            the login page again when not, or the error page.
        """
        checked = self._check_form(request)
        if isinstance(checked, Reply):
            return checked
        session, interaction = checked
        form = request.first_form
        username, password = form.get("username", ""), form.get("password", "")
        if not (username and self._oauth.store.check_account(username, password)):
            return self._login_page(interaction, session, "Wrong username or password.")
        renewed = _Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), username)
        with self._lock:
            # A new session id at sign-in defeats session fixation.
            self._sessions.pop(session.id, None)
            self._sessions[renewed.id] = renewed
            interaction.session_id = renewed.id
            interaction.signed_in = True
        return self._see_other(interaction.uid, _cookie(renewed.id))

    def consent(self, request: Request) -> Reply:
        """Serve ``POST /interaction/consent``: issue a code, or deny.

        Args:
            request: The consent form submission (``decision=approve`` or ``deny``).

        Returns:
            302 to the redirect URI with ``code``, ``state`` and ``iss``, or with
            ``error=access_denied``, ``state`` and ``iss``; or the error page.
        """
        checked = self._check_form(request)
        if isinstance(checked, Reply):
            return checked
        session, interaction = checked
        if not interaction.signed_in or session.user is None:
            return error_page(403, "login_required", "Sign in before giving consent.")
        with self._lock:
            if self._interactions.pop(interaction.uid, None) is None:
                return error_page(400, "invalid_request", "This request was already answered.")
            denied_by_test = self._denials > 0
            self._denials -= denied_by_test
        approve = request.first_form.get("decision") == "approve" and not denied_by_test
        try:
            grant = self._oauth.get_consent_grant(interaction.request, end_user=session.user)
        except OAuth2Error as error:
            return self._error(error)
        reply: Reply = self._oauth.create_authorization_response(
            grant.request, grant_user=session.user if approve else None, grant=grant
        )
        return self._with_iss(reply)

    # -- helpers -------------------------------------------------------------------------

    def _error(self, error: OAuth2Error) -> Reply:
        status, _, headers = error()
        if error.redirect_uri:
            return self._with_iss(Reply(status, b"", list(headers)))
        description = error.description or ""
        return error_page(status if status >= 400 else 400, str(error.error), description)

    def _with_iss(self, reply: Reply) -> Reply:
        with self._lock:
            forged = self._forged_iss.pop(0) if self._forged_iss else None
        issuer = forged if forged is not None else self._issuer()
        headers = [("Cache-Control", "no-store")]
        for name, value in reply.headers:
            if name.lower() == "location":
                headers.append((name, add_params_to_uri(value, [("iss", issuer)])))
        return Reply(reply.status, b"", headers)

    def _see_other(self, uid: str, cookie: str | None) -> Reply:
        headers = [("Location", f"{INTERACTION_PATH}?uid={quote(uid)}")]
        headers.append(("Cache-Control", "no-store"))
        if cookie is not None:
            headers.append(("Set-Cookie", cookie))
        return Reply(303, b"", headers)

    def _session_for(self, request: Request) -> tuple[_Session, str | None]:
        session = self._session(request)
        if session is not None:
            return session, None
        session = _Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32))
        with self._lock:
            self._sessions[session.id] = session
        return session, _cookie(session.id)

    def _session(self, request: Request) -> _Session | None:
        cookies: SimpleCookie = SimpleCookie()
        try:
            cookies.load(request.headers.get("Cookie", ""))
        except CookieError:
            return None
        morsel = cookies.get(SESSION_COOKIE)
        if morsel is None:
            return None
        with self._lock:
            return self._sessions.get(morsel.value)

    def _find(self, request: Request, uid: str) -> tuple[_Session, _Interaction] | Reply:
        session = self._session(request)
        if session is None:
            return error_page(403, "session_required", "Your session is missing or expired.")
        with self._lock:
            interaction = self._interactions.get(uid)
        if (
            interaction is None
            or interaction.session_id != session.id
            or self._oauth.codes.clock() >= interaction.expires_at
        ):
            return error_page(400, "invalid_request", "Unknown or expired sign-in request.")
        return session, interaction

    def _check_form(self, request: Request) -> tuple[_Session, _Interaction] | Reply:
        form = request.first_form
        found = self._find(request, form.get("uid", ""))
        if isinstance(found, Reply):
            return found
        if not equal_secrets(found[0].csrf, form.get("csrf_token", "")):
            return error_page(403, "csrf_token_invalid", "The form's CSRF token is missing.")
        return found

    def _login_page(self, interaction: _Interaction, session: _Session, message: str = "") -> Reply:
        client_id = interaction.request.query.get("client_id", [""])[0]
        return login_page(
            action=LOGIN_FORM_PATH,
            uid=interaction.uid,
            csrf=session.csrf,
            client_id=client_id,
            message=message,
        )

    def _consent_page(self, interaction: _Interaction, session: _Session, user: str) -> Reply:
        query = interaction.request.query
        return consent_page(
            action=CONSENT_PATH,
            uid=interaction.uid,
            csrf=session.csrf,
            client_id=query.get("client_id", [""])[0],
            user=user,
            scope=query.get("scope", [""])[0],
            redirect_uri=query.get("redirect_uri", [""])[0],
        )


def _cookie(session_id: str) -> str:
    return f"{SESSION_COOKIE}={session_id}; Path=/; HttpOnly; SameSite=Lax"
