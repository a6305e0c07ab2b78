"""The Python client: `Client`, `Explanation` and friends (grpcio, protobuf and numpy only).

Plots (`service.client.plots`), the HTML report (`service.client.report`) and batch files
(`service.client.batch`) import matplotlib, pandas or pyarrow when used: the extras
`sidelight[plots]`, `sidelight[pandas]`, `sidelight[parquet]`."""

from service.client.client import CallError, Client, Options, Retry
from service.client.explanation import Cost, Explanation, RowDetail

__all__ = ["CallError", "Client", "Cost", "Explanation", "Options", "Retry", "RowDetail"]
