"""The API's routes, one module per resource; each has an ``add_routes(app, …)`` that
:func:`tokenbroker.api.app.create_app` calls."""
