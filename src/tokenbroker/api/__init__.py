"""The HTTP API (FastAPI + a plain-ASGI fast path for token reads): ``create_app`` in
:mod:`tokenbroker.api.app`. Needs the ``server`` extra; ``import tokenbroker`` never
imports it."""
