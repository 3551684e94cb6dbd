"""The status page's HTML, rendered on the server from plain string templates.

Every value goes through :func:`html.escape` (:func:`_e`) on its way into the page; the
page has no inline script or style (its Content-Security-Policy forbids both): behaviour is
``/ui/static/console.js`` and looks are ``/ui/static/console.css``. Rows carry their item id
(``data-item``) and raw values (``data-*``) so the script can update them in place from
``/v1/events`` with the same formatting as here.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from typing import Any

from .views import Snapshot

__all__ = ["ago", "login_page", "message_page", "status_page"]


def _e(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def ago(seconds: float | None) -> str:
    """A duration in words: ``42 s``, ``3 min``, ``2 h``, ``5 d``; ``-`` for None."""
    if seconds is None:
        return "-"
    seconds = max(0.0, seconds)
    for size, unit in ((86400, "d"), (3600, "h"), (60, "min")):
        if seconds >= size:
            return f"{int(seconds // size)} {unit}"
    return f"{int(seconds)} s"


def _moment(epoch: float | None, now: float) -> str:
    return "-" if epoch is None else ago(now - epoch) + " ago"


def _layout(title: str, body: str, *, header: str = "") -> str:
    return (
        "<!doctype html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)}</title>"
        '<link rel="stylesheet" href="/ui/static/console.css">'
        '<script src="/ui/static/console.js" defer></script>'
        f"</head><body><header><h1>tokenbroker</h1>{header}</header>"
        f"<main>{body}</main></body></html>\n"
    )


def login_page(login_token: str, error: str | None = None) -> str:
    """The login form: one password field for a consumer key with the ``admin`` rule."""
    problem = f'<p class="error" role="alert">{_e(error)}</p>' if error else ""
    body = (
        '<section class="login"><h2>Sign in</h2>'
        "<p>Paste a consumer key whose allow list has <code>admin</code>. "
        "It is checked once; the page then works on a signed session cookie.</p>"
        f"{problem}"
        '<form method="post" action="/ui/login">'
        f'<input type="hidden" name="csrf" value="{_e(login_token)}">'
        '<label for="key">Consumer key</label> '
        '<input id="key" name="key" type="password" autocomplete="off" required> '
        '<button type="submit">Sign in</button></form></section>'
    )
    return _layout("tokenbroker: sign in", body)


def message_page(title: str, text: str) -> str:
    """A page with one message (403 and other refusals)."""
    body = f"<section><h2>{_e(title)}</h2><p>{_e(text)}</p></section>"
    return _layout(f"tokenbroker: {title}", body)


def _form(action: str, csrf: str, label: str, fields: dict[str, str], css: str) -> str:
    hidden = "".join(
        f'<input type="hidden" name="{_e(k)}" value="{_e(v)}">' for k, v in fields.items()
    )
    return (
        f'<form method="post" action="{_e(action)}" class="inline">'
        f'<input type="hidden" name="csrf" value="{_e(csrf)}">{hidden}'
        f'<button type="submit" class="{_e(css)}">{_e(label)}</button></form>'
    )


def provider_row(row: dict[str, Any], csrf: str, now: float) -> str:
    """One provider's ``<tr>``."""
    name = row["name"]
    buttons = _form("/ui/jobs", csrf, "Refresh", {"kind": "refresh", "provider": name}, "refresh")
    if row["reauthorizable"]:
        fields = {"kind": "authorize", "provider": name}
        buttons += _form("/ui/jobs", csrf, "Re-authorise", fields, "authorize")
    expires = row["expires_at"]
    error = row["last_error"] or "-"
    if row["last_code"]:
        error += f" ({row['last_code']})"
    return (
        f'<tr data-item="provider:{_e(name)}" data-expires-at="{_e(expires)}"'
        f' data-last-refresh="{_e(row["last_refresh"])}" data-severity="{_e(row["severity"])}">'
        f'<td class="name">{_e(name)}</td><td>{_e(row["grant"])}</td>'
        f'<td class="state"><span class="state {_e(row["state"])}">{_e(row["state"])}</span></td>'
        f'<td class="expires">{_e("-" if expires is None else ago(expires - now))}</td>'
        f'<td class="refreshed">{_e(_moment(row["last_refresh"], now))}</td>'
        f'<td class="error">{_e(error)}</td>'
        f'<td class="actions">{buttons}<span class="note"></span></td></tr>'
    )


def pool_row(row: dict[str, Any]) -> str:
    """One pool route's ``<tr>``."""
    wait = row["oldest_wait"]
    cells = "".join(
        f'<td class="{key}">{_e(row[key])}</td>'
        for key in ("leased", "idle", "refreshing", "failed", "waiting")
    )
    return (
        f'<tr data-item="pool:{_e(row["prefix"])}"><td class="name">{_e(row["prefix"])}</td>'
        f"<td>{_e(row['provider'])}</td>{cells}"
        f'<td class="oldest_wait">{_e("-" if wait is None else ago(wait))}</td></tr>'
    )


def job_row(row: dict[str, Any], csrf: str, now: float) -> str:
    """One job's ``<tr>``."""
    job_id = row["job_id"]
    buttons = ""
    if row["cancellable"]:
        buttons += _form(f"/ui/jobs/{job_id}/cancel", csrf, "Cancel", {}, "cancel")
    if row["retryable"]:
        buttons += _form(f"/ui/jobs/{job_id}/retry", csrf, "Retry", {}, "retry")
    failed = ", ".join(f"{f['item']}: {f['reason']}" for f in row["failed"]) or (
        row["error"] or "-"
    )
    items = row["items"]
    return (
        f'<tr data-item="job:{_e(job_id)}" data-heartbeat-at="{_e(row["heartbeat_at"])}">'
        f'<td class="name"><code>{_e(job_id)}</code></td>'
        f"<td>{_e(row['kind'])}</td><td>{_e(row['provider'] or '-')}</td>"
        f'<td class="status"><span class="status {_e(row["status"])}">{_e(row["status"])}</span>'
        f'</td><td class="phase">{_e(row["phase"] or "-")}</td>'
        f'<td class="progress"><progress max="100" value="{_e(row["progress"])}"></progress> '
        f'<span class="pct">{_e(int(row["progress"]))}%</span></td>'
        f'<td class="heartbeat">{_e(_moment(row["heartbeat_at"], now))}</td>'
        f'<td class="items">{_e(items["ok"])}/{_e(items["total"])} ok</td>'
        f'<td class="failed-items">{_e(failed)}</td>'
        f'<td class="actions">{buttons}</td></tr>'
    )


def _table(name: str, heads: Iterable[str], rows: str, empty: str) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in heads)
    return (
        f'<section id="{name}"><h2>{_e(name.capitalize())}</h2>'
        f'<table class="{name}"><thead><tr>{head}</tr></thead>'
        f'<tbody data-kind="{name[:-1]}">{rows}</tbody></table>'
        f'<p class="empty">{_e(empty) if not rows else ""}</p></section>'
    )


def status_page(snap: Snapshot, csrf: str, consumer: str, notice: str | None = None) -> str:
    """The whole status page for ``snap``; the live script takes it from there."""
    now = time.time()
    service = snap.service
    providers = "".join(provider_row(r, csrf, now) for r in snap.of("provider"))
    pools = "".join(pool_row(r) for r in snap.of("pool"))
    jobs = "".join(job_row(r, csrf, now) for r in snap.of("job"))
    pools_empty = (
        "No pool routes."
        if service.get("pools_visible")
        else "The token proxy does not run in this process: its pools are not visible here."
    )
    degraded = ", ".join(service.get("degraded_parts", ())) or "no"
    header = (
        f'<p class="who">signed in as <b>{_e(consumer)}</b> '
        f'<span id="live" class="live">connecting…</span> '
        f"{_form('/ui/logout', csrf, 'Sign out', {}, 'logout')}</p>"
    )
    banner = f'<p class="notice" role="status">{_e(notice)}</p>' if notice else ""
    service_html = (
        '<section id="service"><h2>Service</h2><dl data-item="service"'
        f' data-started="{_e(service.get("started"))}">'
        f'<dt>Degraded</dt><dd class="degraded">{_e(degraded)}</dd>'
        f'<dt>Store</dt><dd class="store">{_e(service.get("store"))}</dd>'
        f'<dt>Encryption key id</dt><dd class="key_id">{_e(service.get("key_id") or "none")}</dd>'
        f'<dt>Version</dt><dd class="version">{_e(service.get("version"))}</dd>'
        f'<dt>Uptime</dt><dd class="uptime">{_e(ago(now - service.get("started", now)))}</dd>'
        "</dl></section>"
    )
    body = (
        f'{banner}<div id="page" data-csrf="{_e(csrf)}">'
        + _table(
            "providers",
            ("Provider", "Grant", "State", "Expires in", "Last refresh", "Last error", ""),
            providers,
            "No providers configured.",
        )
        + _table(
            "pools",
            (
                "Route",
                "Provider",
                "Leased",
                "Idle",
                "Refreshing",
                "Failed",
                "Waiting",
                "Oldest wait",
            ),
            pools,
            pools_empty,
        )
        + _table(
            "jobs",
            (
                "Job",
                "Kind",
                "Provider",
                "Status",
                "Phase",
                "Progress",
                "Heartbeat",
                "Items",
                "Failed items",
                "",
            ),
            jobs,
            "No jobs yet.",
        )
        + service_html
        + "</div>"
    )
    return _layout("tokenbroker: status", body, header=header)
