"""The broker's HTTP API (DESIGN §3.3): ``create_app(broker)``.

A thin layer, assembled here from one module per concern: :mod:`.access` authenticates the
consumer and checks the ACL, :mod:`.routes` call the broker (one module per resource),
:mod:`.errors` maps every error to a status through one table, :mod:`.audit` writes a line
per token handed out, :mod:`.middleware` gives requests ids, limits and metrics, and
:mod:`.openapi` documents it all. Unknown and forbidden providers get the same
byte-identical 404. Every response that carries a token has ``Cache-Control: no-store``
and ``Pragma: no-cache``; no response ever carries a refresh token.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from .. import __version__
from ..cluster import windows_for
from ..edge.ratelimit import RateLimits
from ..engine.broker import Broker
from ..engine.consumers import ConsumerRegistry
from ..jobs.service import JobService
from ..telemetry.metrics import Metrics
from .access import following
from .errors import add_error_handlers
from .middleware import RequestContext
from .models import ErrorResponse
from .openapi import add_document_route, document_errors
from .routes import compat, delegations, events, jobs, oauth, probes, providers, redirects, tokens
from .sse import StreamGauge
from .status_feed import StatusFeed
from .tracing import TraceRequests
from .ui import routes as ui
from .ui.session import SessionSigner
from .ui.views import StatusView

__all__ = ["create_app"]


def create_app(
    broker: Broker,
    consumers: ConsumerRegistry | None = None,
    *,
    metrics: Metrics | None = None,
    limits: RateLimits | None = None,
    openapi: bool | None = None,
    job_service: JobService | None = None,
) -> FastAPI:
    """Build the HTTP API around ``broker``.

    Args:
        broker: The broker to serve.
        consumers: Who may call; default: the ``consumers:`` config section plus the
            consumers in the store (``tokenbroker consumers add``). While the app runs
            (ASGI lifespan) the registry follows its store, so added and removed consumers
            take effect within a second.
        metrics: Prometheus metrics; default: a new registry subscribed to ``broker``.
        limits: Rate limits; default: ``server.rate_limit`` per consumer and
            10 failed key checks a minute per client address.
        openapi: Serve the OpenAPI document at ``/openapi.json``, to consumers with a key
            only; default: ``server.openapi`` (off: the route does not exist).
        job_service: The jobs behind ``/v1/jobs``; default: a new
            :class:`~tokenbroker.jobs.service.JobService` of ``broker`` whose loop nobody
            runs (jobs are queued in the store for an instance that runs one; ``serve``
            passes the one it runs). Kept as ``app.state.jobs``.

    The status page (``/ui``) and ``/v1/events`` read ``app.state.status`` (a
    :class:`~tokenbroker.api.ui.views.StatusView`; ``serve`` sets its ``pools`` to the proxy
    it runs in the same process) through ``app.state.feed``.

    Returns:
        The ASGI application.
    """
    registry = consumers
    if registry is None:
        registry = ConsumerRegistry.load(
            broker.settings.consumers, broker.store, broker.coordinator
        )
    meter = metrics or Metrics(broker)
    server = broker.settings.server
    service = job_service or JobService(broker)
    view = StatusView(broker, service)
    feed = StatusFeed(view.snapshot, broker.subscribe, lambda: service.subscribe(None))
    view.last_codes = feed.last_codes
    app = FastAPI(
        title="tokenbroker",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served by add_document_route, behind a key, when enabled
        responses={401: {"model": ErrorResponse}},
        lifespan=following(registry, on_shutdown=feed.stop),
        # FastAPI's own OpenTelemetry spans and logs stay off (they would follow a global
        # provider and record exception text): the API's spans are TraceRequests'.
        telemetry={"tracing": False, "metrics": False, "logs": False, "auto_configure": False},
    )
    app.state.limits = limits or RateLimits(
        server.rate_limit, shared=windows_for(broker.coordinator)
    )
    app.state.consumers = registry
    app.state.jobs = service
    app.state.status = view  # serve sets view.pools once its proxy runs
    app.state.feed = feed
    app.state.sessions = SessionSigner(broker.settings.encryption_keys)
    streams = StreamGauge()
    app.state.streams = streams
    meter.count_streams(lambda: streams.open)
    origins = list(server.cors_origins)
    if origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=origins,
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    app.add_middleware(RequestContext, metrics=meter)
    app.add_middleware(TraceRequests)  # outermost: log lines of the request carry its ids
    tokens.add_routes(app, broker, meter)  # first: the hot route is matched first
    delegations.add_routes(app, broker)
    redirects.add_routes(app, broker)
    providers.add_routes(app, broker)
    jobs.add_routes(app, broker, service, streams)
    events.add_routes(app, feed, streams, service.settings.heartbeat_seconds)
    ui.add_routes(app, view)
    oauth.add_routes(app, service)
    probes.add_routes(app, broker, meter)
    compat.add_routes(app, broker)  # only what compat: configures (issue 19 §5)
    add_error_handlers(app)
    document_errors(app)
    if server.openapi if openapi is None else openapi:
        add_document_route(app)
    return app
