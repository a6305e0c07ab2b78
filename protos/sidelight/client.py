"""`from sidelight.client import Client`: the Python client, which lives in `service.client`."""

from service.client import CallError, Client, Cost, Explanation, Options, Retry, RowDetail

__all__ = ["CallError", "Client", "Cost", "Explanation", "Options", "Retry", "RowDetail"]
