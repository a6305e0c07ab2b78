"""Prometheus series and drift windows, fed off the request path."""
