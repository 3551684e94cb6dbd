"""The broker itself: the token cache (single-flight, refresh-ahead) and its slots, the
provider catalog (keys, timing, retry policy), the credentials' store and rows, the fenced
refresher, delegation, consumers and their rules, and :class:`Broker`, the composition
root. Depends on core, config, grants and store; never on api, proxy, cli, FastAPI,
prometheus_client or uvicorn."""
