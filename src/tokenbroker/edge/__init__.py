"""What every listening port shares (the API, the proxy and its health port): the one
table from domain error to HTTP status, request-head bounds, the failed-key limiter and
the file-descriptor budget. No web framework here."""
