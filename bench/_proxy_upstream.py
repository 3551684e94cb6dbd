"""The nginx side of ``proxy.py``: the upstream every path leads to, and the reference proxy.

Both are Debian's nginx (``make bench-deps``), each its own foreground master
(``daemon off``) with one worker, its pid file, error log and temporary directories under
a directory of the benchmark's own, so nothing touches a system-wide nginx. Neither logs
requests.

* The upstream answers every path with a constant ``{"ok":true}`` as
  ``application/json``, except :data:`ECHO_PATH`, which answers with the
  ``Authorization`` header it received (for the checks before measuring). Client
  connections are kept alive for 10^8 requests, so wrk never reconnects.
* The reference proxy passes every path to the upstream over a pool of at most 64 idle
  keep-alive connections (HTTP/1.1, ``Connection`` cleared) and sets
  ``Authorization: Bearer <token>`` on each request: what a hand-written nginx config
  does with a token obtained elsewhere.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

BODY = '{"ok":true}'
ECHO_PATH = "/echo-auth"
KEEPALIVE_REQUESTS = 100_000_000
UPSTREAM_KEEPALIVE = 64
START_SECONDS = 10.0


def nginx_binary() -> str | None:
    """Where nginx is (Debian puts it in ``/usr/sbin``, off a normal user's PATH)."""
    found = shutil.which("nginx") or "/usr/sbin/nginx"
    return found if os.access(found, os.X_OK) else None


def nginx_version(nginx: str) -> str:
    """``nginx/1.22.1`` or the like."""
    done = subprocess.run([nginx, "-v"], capture_output=True, text=True, timeout=10)
    return done.stderr.strip().removeprefix("nginx version: ")


def nginx_conf(home: Path, http: str) -> Path:
    """Write ``home/nginx.conf``: one worker, every file under ``home``, ``http`` inside.

    Args:
        home: A directory that exists and belongs to this run.
        http: The ``server`` (and ``upstream``) blocks.

    Returns:
        The config's path.
    """
    temp_paths = "\n".join(
        f"    {kind}_temp_path {home / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    conf = home / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
pid {home / "nginx.pid"};
error_log {home / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    keepalive_requests {KEEPALIVE_REQUESTS};
    keepalive_timeout 75s;
{temp_paths}
{http}
}}
""")
    return conf


def upstream_http(port: int) -> str:
    """The upstream's server block on 127.0.0.1:``port``."""
    return f"""
    server {{
        listen 127.0.0.1:{port};
        location / {{ default_type application/json; return 200 '{BODY}'; }}
        location = {ECHO_PATH} {{ default_type text/plain; return 200 $http_authorization; }}
    }}"""


def reference_http(port: int, upstream: int, token: str) -> str:
    """The reference proxy's blocks: 127.0.0.1:``port`` to the upstream, with ``token``."""
    return f"""
    upstream upstream_pool {{
        server 127.0.0.1:{upstream};
        keepalive {UPSTREAM_KEEPALIVE};
        keepalive_requests {KEEPALIVE_REQUESTS};
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://upstream_pool;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {token}";
        }}
    }}"""


def start_nginx(
    nginx: str, conf: Path, port: int, prefix: Sequence[str], log: IO[bytes]
) -> subprocess.Popen[bytes]:
    """Run nginx in the foreground; return once it accepts connections on ``port``.

    Args:
        nginx: The binary.
        conf: A config from :func:`nginx_conf`.
        port: The port it listens on.
        prefix: Put before the command (``taskset -c N``).
        log: Where its stdout and stderr go.

    Returns:
        The master process; SIGTERM ends it and its worker.

    Raises:
        SystemExit: It exited or did not listen within :data:`START_SECONDS`.
    """
    home = conf.parent
    command = [nginx, "-p", str(home), "-e", str(home / "error.log"), "-c", str(conf)]
    process = subprocess.Popen(
        [*prefix, *command, "-g", "daemon off;"], stdin=subprocess.DEVNULL, stdout=log, stderr=log
    )
    deadline = time.monotonic() + START_SECONDS
    while True:
        if process.poll() is not None:
            error_log = (home / "error.log").read_text(errors="replace")[-2000:]
            raise SystemExit(f"nginx ({conf}) exited ({process.returncode}):\n{error_log}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return process
        except OSError:
            if time.monotonic() > deadline:
                process.terminate()
                process.wait(timeout=10)
                raise SystemExit(f"nginx ({conf}) does not listen on port {port}") from None
            time.sleep(0.05)
