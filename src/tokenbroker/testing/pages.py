"""The HTML pages of the test authorization server: login, consent and error.

Plain forms that work without JavaScript, so a test can drive them with one HTTP client
and a cookie jar, or in a real browser under the strict ``Content-Security-Policy`` every
page is sent with (no script, no style, no framing). Every interpolated value is
HTML-escaped.
"""

from __future__ import annotations

from html import escape
from urllib.parse import urlsplit

from tokenbroker.testing.messages import Reply

__all__ = ["consent_page", "error_page", "login_page"]


def _security_headers(form_origin: str | None) -> list[tuple[str, str]]:
    # Chromium applies form-action to the redirect that follows a form POST, so the
    # consent page must allow the client's origin for its final 302.
    targets = "'self'" + (f" {form_origin}" if form_origin else "")
    csp = f"default-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action {targets}"
    return [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Security-Policy", csp),
        ("X-Frame-Options", "DENY"),
        ("X-Content-Type-Options", "nosniff"),
        ("Referrer-Policy", "no-referrer"),
        ("Cache-Control", "no-store"),
    ]


def _page(title: str, body: str) -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>{escape(title)}</title></head>\n"
        f"<body>\n<h1>{escape(title)}</h1>\n{body}\n</body></html>\n"
    )


def _hidden(name: str, value: str) -> str:
    return f'<input type="hidden" name="{escape(name)}" value="{escape(value)}">'


def login_page(*, action: str, uid: str, csrf: str, client_id: str, message: str = "") -> Reply:
    """Render the login form.

    Args:
        action: The path the form posts to.
        uid: The interaction id, posted back as ``uid``.
        csrf: The session's CSRF token, posted back as ``csrf_token``.
        client_id: The client asking for access, shown to the user.
        message: An error to show (e.g. wrong password), or ``""``.

    Returns:
        A 200 reply.
    """
    note = f'<p role="alert">{escape(message)}</p>\n' if message else ""
    body = (
        f"<p>Sign in to continue to <strong>{escape(client_id)}</strong>.</p>\n{note}"
        f'<form method="post" action="{escape(action)}">\n'
        f"{_hidden('uid', uid)}\n{_hidden('csrf_token', csrf)}\n"
        '<p><label>Username <input name="username" autocomplete="username" required>'
        "</label></p>\n"
        '<p><label>Password <input type="password" name="password" '
        'autocomplete="current-password" required></label></p>\n'
        '<p><button type="submit">Sign in</button></p>\n</form>'
    )
    return Reply(200, _page("Sign in", body).encode("utf-8"), _security_headers(None))


def consent_page(
    *, action: str, uid: str, csrf: str, client_id: str, user: str, scope: str, redirect_uri: str
) -> Reply:
    """Render the consent form with approve and deny buttons.

    Args:
        action: The path the form posts to.
        uid: The interaction id, posted back as ``uid``.
        csrf: The session's CSRF token, posted back as ``csrf_token``.
        client_id: The client asking for access.
        user: The signed-in account.
        scope: The space-separated scope asked for.
        redirect_uri: Where the answer goes (its origin is allowed as a form target).

    Returns:
        A 200 reply.
    """
    items = "".join(f"<li>{escape(s)}</li>" for s in scope.split()) or "<li>(none)</li>"
    body = (
        f"<p>Signed in as <strong>{escape(user)}</strong>.</p>\n"
        f"<p><strong>{escape(client_id)}</strong> asks for:</p>\n<ul>{items}</ul>\n"
        f'<form method="post" action="{escape(action)}">\n'
        f"{_hidden('uid', uid)}\n{_hidden('csrf_token', csrf)}\n"
        '<p><button type="submit" name="decision" value="approve">Allow</button>\n'
        '<button type="submit" name="decision" value="deny">Deny</button></p>\n</form>'
    )
    parts = urlsplit(redirect_uri)
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
    return Reply(200, _page("Authorize access", body).encode("utf-8"), _security_headers(origin))


def error_page(status: int, error: str, description: str = "") -> Reply:
    """Render the server's own error page; nothing is redirected to the client.

    Args:
        status: The status code.
        error: The OAuth error code (RFC 6749 §4.1.2.1) or a short reason.
        description: A human-readable explanation.

    Returns:
        The reply.
    """
    detail = f"<p>{escape(description)}</p>" if description else ""
    body = f'<p>Error: <code id="error">{escape(error)}</code></p>\n{detail}'
    return Reply(
        status, _page("Authorization error", body).encode("utf-8"), _security_headers(None)
    )
