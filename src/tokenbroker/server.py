"""``tokenbroker serve``: the HTTP API on uvicorn (uvloop + httptools), with tokens kept warm."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import uvicorn

from .app import create_app
from .broker import Broker
from .logs import configure

__all__ = ["serve"]

logger = logging.getLogger("tokenbroker.server")

DEFAULT_LISTEN = "127.0.0.1:8750"


def _keep_warm(broker: Broker, stop: threading.Event, every: float = 1.0) -> None:
    """Start refresh-ahead for idle tokens, so no consumer ever waits once warm."""
    while not stop.wait(every):
        try:
            broker.refresh_due()
        except Exception:
            logger.exception("keep-warm tick failed")


def serve(config_path: Path, listen: str | None = None) -> None:
    """Run the broker's HTTP API until interrupted.

    Args:
        config_path: The YAML configuration.
        listen: ``host:port``; default ``server.listen`` from the config, else 127.0.0.1:8750.
    """
    broker = Broker.from_config(config_path)
    telemetry = broker.settings.telemetry
    configure(str(telemetry.get("log_level") or "info"), str(telemetry.get("log_format") or "json"))
    address = listen or str(broker.settings.server.get("listen") or DEFAULT_LISTEN)
    host, _, port = address.rpartition(":")
    stop = threading.Event()
    ticker = threading.Thread(target=_keep_warm, args=(broker, stop), daemon=True)
    ticker.start()
    try:
        uvicorn.run(
            create_app(broker),
            host=host.strip("[]") or "127.0.0.1",
            port=int(port),
            loop="uvloop",
            http="httptools",
            log_level="warning",
            access_log=False,
            server_header=False,
        )
    finally:
        stop.set()
        broker.close()
