"""The baseline server of ``api.py``: a bare constant-JSON endpoint, served like the real API.

``python _api_server.py PORT BODY_JSON`` serves ``GET /bare/{provider}`` on 127.0.0.1:PORT:
a FastAPI app whose one route answers ``BODY_JSON`` (parsed once, serialised per request by
``JSONResponse``, like the token route) with ``Cache-Control: no-store`` and ``Pragma:
no-cache``. Logging is set up as :func:`tokenbroker.server.serve` sets it up by default
(JSON lines at info on stderr; this app writes none per request) and uvicorn gets that
function's options: one worker, uvloop, httptools, log level warning, no access log, no
``server`` header. So the only difference from the real API is its consumer
authentication, ACL, token cache, middleware, request logging and extra routes.

It runs until terminated; ``api.py`` starts it, pinned to a core, and ends it by PID.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse

from tokenbroker.telemetry.logs import configure

NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def bare_app(body: dict[str, Any]) -> FastAPI:
    """A FastAPI app with one GET route answering ``body`` as JSON, never cached.

    Args:
        body: The constant answer.

    Returns:
        The ASGI application.
    """
    app = FastAPI(docs_url=None, redoc_url=None)

    @app.get("/bare/{provider}")
    async def bare(provider: str) -> JSONResponse:
        return JSONResponse(body, headers=NO_STORE)

    return app


def main() -> None:
    port, body = int(sys.argv[1]), json.loads(sys.argv[2])
    configure("info", "json")
    uvicorn.run(
        bare_app(body),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        server_header=False,
    )


if __name__ == "__main__":
    main()
