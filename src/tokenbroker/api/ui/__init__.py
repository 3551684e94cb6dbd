"""The status page at ``/ui`` (issue 18 §2): sessions, views, pages, routes, static files."""
