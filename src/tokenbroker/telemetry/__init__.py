"""Logs (formatters, configured only by the CLI) and Prometheus metrics (the only
place prometheus_client is imported); both subscribe to the broker's events."""
