"""Batch files: any number of rows read in request-sized chunks (.npy, .csv, .parquet), sent
with bounded concurrency, written in input order (.parquet, .csv, .npy) as records of
`row`, `output`, `<feature>`, `<feature>_se`, `base_value`, `prediction`.

Memory stays bounded: a .npy input is memory-mapped, .csv and .parquet inputs are streamed, at
most `2 x concurrency` chunks are in flight or waiting to be written, and results are kept only
when asked (`keep=True`, for plots and reports). Transient failures are retried by the client;
a chunk that still fails is reported with its rows and left out, and the run goes on."""

from __future__ import annotations

import csv
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import IO, Any, Protocol

import numpy as np

from service.client.client import DEFAULT, CallError, Client, Options
from service.client.explanation import Explanation, concatenate
from service.client.inputs import Inputs, feature_columns, from_array, from_columns
from service.client.wire import Array
from sidelight.v1 import explainer_pb2 as pb

INPUTS = (".npy", ".csv", ".parquet")
CHUNK_ROWS = 256  # the server's default SIDELIGHT_MAX_ROWS_PER_REQUEST
CONCURRENCY = 4
GIVE_UP_AFTER = 3  # chunk failures before any success: the rest would fail alike


class Source(Protocol):
    """Rows to explain: how many (None when unknown) and the model inputs chunk by chunk."""

    rows: int | None
    ignored: tuple[str, ...]

    def chunks(self, size: int) -> Iterator[Inputs]: ...


@dataclass
class Prepared:
    """Rows already in memory (arrays, DataFrames, --row, --text)."""

    inputs: Inputs
    rows: int | None = None
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.rows, self.ignored = self.inputs.rows, self.inputs.ignored

    def chunks(self, size: int) -> Iterator[Inputs]:
        for start in range(0, self.inputs.rows, size):
            yield self.inputs.slice(start, start + size)


@dataclass
class Head:
    """The first `limit` rows of another source (`--first`)."""

    source: Source
    limit: int
    rows: int | None = None
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        known = self.source.rows
        self.rows = self.limit if known is None else min(known, self.limit)
        self.ignored = self.source.ignored

    def chunks(self, size: int) -> Iterator[Inputs]:
        left = self.limit
        for chunk in self.source.chunks(min(size, self.limit)):
            if left <= 0:
                return
            yield chunk.slice(0, left) if chunk.rows > left else chunk
            left -= chunk.rows


@dataclass
class NpySource:
    """A .npy file, batch axis first, shaped like the model's input (or its columns side by
    side); memory-mapped, so only the chunks being sent are read."""

    info: pb.ModelInfo
    values: Array
    rows: int | None = None
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.rows = len(self.values)

    def chunks(self, size: int) -> Iterator[Inputs]:
        for start in range(0, len(self.values), size):
            yield from_array(self.info, np.asarray(self.values[start:start + size]))


@dataclass
class CsvSource:
    """A .csv file with a header row naming the features (other columns are ignored), or no
    header and exactly the model's columns in order; streamed."""

    info: pb.ModelInfo
    path: Path
    rows: int | None = None
    ignored: tuple[str, ...] = ()
    header: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        with self.path.open(newline="") as f:
            reader = csv.reader(f)
            first = next(reader, [])
            named = first == list(self.info.feature_names)  # names may look like numbers
            self.header = first if named or not numeric(first) else []
            self.rows = sum(1 for _ in reader) + (0 if self.header else int(bool(first)))
        if self.header:
            feature_columns(self.info, self.header)
        names = set(self.info.feature_names)
        self.ignored = tuple(c for c in self.header if c not in names)

    def chunks(self, size: int) -> Iterator[Inputs]:
        with self.path.open(newline="") as f:
            reader = csv.reader(f)
            line = 1
            if self.header:
                next(reader)
                line = 2
            while block := list(islice(reader, size)):
                yield self._inputs(block, line)
                line += len(block)

    def _inputs(self, block: list[list[str]], line: int) -> Inputs:
        try:
            values = np.array(block, dtype=np.float64)  # (rows, columns)
        except ValueError as err:
            bad = next(k for k, r in enumerate(block) if not numeric(r))
            raise ValueError(f"{self.path.name} line {line + bad}: {err}") from None
        if self.header:
            return from_columns(self.info, self.header, values)
        return from_array(self.info, values)


def numeric(row: list[str]) -> bool:
    try:
        [float(v) for v in row]
    except ValueError:
        return False
    return bool(row)


@dataclass
class ParquetSource:
    """A .parquet file with a column per feature (others ignored), read in record batches."""

    info: pb.ModelInfo
    path: Path
    rows: int | None = None
    ignored: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        pq = parquet()
        meta = pq.ParquetFile(self.path)
        self.rows = meta.metadata.num_rows
        feature_columns(self.info, meta.schema_arrow.names)
        names = set(self.info.feature_names)
        self.ignored = tuple(c for c in meta.schema_arrow.names if c not in names)

    def chunks(self, size: int) -> Iterator[Inputs]:
        f = parquet().ParquetFile(self.path)
        columns = [c for c in f.schema_arrow.names if c in set(self.info.feature_names)]
        for batch in f.iter_batches(batch_size=size, columns=columns):
            values = np.column_stack([c.to_numpy(zero_copy_only=False) for c in batch.columns])
            yield from_columns(self.info, columns, values.astype(np.float64))


def parquet() -> Any:
    try:
        import pyarrow.parquet as pq
    except ImportError as err:
        raise ImportError("parquet files need pyarrow: pip install 'sidelight[parquet]'") \
            from err
    return pq


def open_source(path: Path, info: pb.ModelInfo) -> Source:
    """The rows of a .npy, .csv or .parquet file for model `info`."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return NpySource(info, np.load(path, mmap_mode="r", allow_pickle=False))
    if suffix == ".csv":
        return CsvSource(info, path)
    if suffix == ".parquet":
        return ParquetSource(info, path)
    raise ValueError(f"--input {path.name}: use one of {', '.join(INPUTS)}")


class Sink(Protocol):
    """Where records go, in input order; written to a temporary file renamed on `close`."""

    def write(self, columns: dict[str, Array]) -> None: ...

    def close(self, ok: bool = True) -> None: ...


class CsvSink:
    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, temporary(path)
        self.file: IO[str] = self.tmp.open("w", newline="")
        self.writer = csv.writer(self.file)
        self.started = False

    def write(self, columns: dict[str, Array]) -> None:
        if not self.started:
            self.writer.writerow(columns)
            self.started = True
        cells = [c.tolist() for c in columns.values()]  # floats keep every digit (repr)
        self.writer.writerows(zip(*cells, strict=True))

    def close(self, ok: bool = True) -> None:
        self.file.close()
        finish(self.tmp, self.path, ok)


class ParquetSink:
    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, temporary(path)
        self.writer: Any = None

    def write(self, columns: dict[str, Array]) -> None:
        import pyarrow as pa

        table = pa.table(columns)
        if self.writer is None:
            self.writer = parquet().ParquetWriter(self.tmp, table.schema)
        self.writer.write_table(table)

    def close(self, ok: bool = True) -> None:
        if self.writer is not None:
            self.writer.close()
        finish(self.tmp, self.path, ok and self.writer is not None)


class NpySink:
    """A structured array with the same named columns (np.load needs no pickle for it); the
    records go to a side file first, since the count is known only at the end."""

    def __init__(self, path: Path) -> None:
        self.path, self.tmp = path, temporary(path)
        self.data = self.tmp.with_suffix(".records").open("w+b")
        self.dtype: np.dtype[Any] | None = None
        self.count = 0

    def write(self, columns: dict[str, Array]) -> None:
        if self.dtype is None:
            self.dtype = np.dtype([(n, c.dtype if c.dtype.kind != "U" else "U64")
                                   for n, c in columns.items()])
        records = np.empty(len(columns["row"]), self.dtype)
        for name, values in columns.items():
            records[name] = values
        self.data.write(records.tobytes())
        self.count += len(records)

    def close(self, ok: bool = True) -> None:
        if ok and self.dtype is not None:
            with self.tmp.open("wb") as f:
                header = {"descr": np.lib.format.dtype_to_descr(self.dtype),
                          "fortran_order": False, "shape": (self.count,)}
                np.lib.format.write_array_header_2_0(f, header)
                self.data.seek(0)
                while block := self.data.read(1 << 20):
                    f.write(block)
        self.data.close()
        os.unlink(self.data.name)
        finish(self.tmp, self.path, ok and self.dtype is not None)


def temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial")


def finish(tmp: Path, path: Path, ok: bool) -> None:
    """Move the finished file into place; drop it when nothing valid was written."""
    if ok:
        os.replace(tmp, path)
    elif tmp.exists():
        tmp.unlink()


def open_sink(path: Path) -> Sink:
    sinks: dict[str, Callable[[Path], Sink]] = {".csv": CsvSink, ".parquet": ParquetSink,
                                                ".npy": NpySink}
    kind = sinks.get(path.suffix.lower())
    if kind is None:
        raise ValueError(f"--out {path.name}: use one of {', '.join(sinks)}")
    if kind is ParquetSink:
        parquet()
    return kind(path)


class Progress:
    """Rows done, rate and ETA: one redrawn line on a terminal, a plain line every `every_s`
    seconds (and at the end) otherwise. Thread-safe."""

    def __init__(self, total: int | None, stream: IO[str] | None = None,
                 interactive: bool | None = None, every_s: float = 5.0) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.interactive = self.stream.isatty() if interactive is None else interactive
        self.total, self.every_s = total, every_s if not self.interactive else 0.1
        self.done, self.started = 0, time.monotonic()
        self.shown = self.started
        self._lock = threading.Lock()

    def advance(self, rows: int) -> None:
        with self._lock:
            self.done += rows
            now = time.monotonic()
            if now - self.shown >= self.every_s:
                self.shown = now
                self._show()

    def note(self, message: str) -> None:
        """A line of its own (a failure, a retry) above the progress line."""
        with self._lock:
            self.stream.write(("\r\x1b[K" if self.interactive else "") + message + "\n")
            self.stream.flush()

    def finish(self) -> None:
        with self._lock:
            self._show()
            if self.interactive:
                self.stream.write("\n")
            self.stream.flush()

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        rate = self.done / elapsed
        of = f"/{self.total:,}" if self.total is not None else ""
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        eta = ""
        if self.total is not None and rate > 0:
            eta = f", ETA {clock((self.total - self.done) / rate)}"
        return f"{self.done:,}{of} rows{pct}, {rate:,.0f} rows/s{eta}"

    def _show(self) -> None:
        if self.interactive:
            self.stream.write("\r\x1b[K" + self.line())
        else:
            self.stream.write("explained " + self.line() + "\n")
        self.stream.flush()


def clock(seconds: float) -> str:
    s = round(seconds)
    hours = f"{s // 3600}:" if s >= 3600 else ""
    return f"{hours}{s // 60 % 60 if hours else s // 60:02d}:{s % 60:02d}"


@dataclass(frozen=True)
class Failure:
    """A chunk that failed after its retries: its first and last row and why."""

    first: int
    last: int
    error: str

    def __str__(self) -> str:
        return f"rows {self.first}-{self.last} failed: {self.error}"


@dataclass
class Result:
    rows: int = 0  # rows explained
    failures: list[Failure] = field(default_factory=list)
    seconds: float = 0.0
    explanation: Explanation | None = None  # when kept


def run(client: Client, model: str, source: Source, options: Options = DEFAULT,
        sink: Sink | None = None, *, chunk_rows: int = CHUNK_ROWS,
        concurrency: int = CONCURRENCY, progress: Progress | None = None, keep: bool = False,
        timeout: float | None = None) -> Result:
    """Explain every row of `source`, `concurrency` requests at a time, writing each chunk's
    records to `sink` in input order."""
    if chunk_rows < 1 or concurrency < 1:
        raise ValueError("chunk_rows and concurrency must be at least 1")
    result, started = Result(), time.monotonic()
    kept: list[Explanation] = []
    window: deque[tuple[int, int, Future[Explanation]]] = deque()
    ok = False
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        try:
            start = 0
            for inputs in source.chunks(chunk_rows):
                window.append((start, inputs.rows, pool.submit(
                    send, client, model, inputs, options, timeout, start, progress)))
                start += inputs.rows
                while len(window) >= 2 * concurrency:
                    collect(window.popleft(), result, sink, kept, keep, progress)
                if len(result.failures) >= GIVE_UP_AFTER and result.rows == 0:
                    break
            while window:
                collect(window.popleft(), result, sink, kept, keep, progress)
            ok = True
        finally:
            for *_, future in window:
                future.cancel()
            if sink is not None:
                sink.close(ok and result.rows > 0)
    if progress is not None:
        progress.finish()
    result.seconds = time.monotonic() - started
    result.explanation = concatenate(kept) if kept else None
    return result


def send(client: Client, model: str, inputs: Inputs, options: Options, timeout: float | None,
         start: int, progress: Progress | None) -> Explanation:
    """One chunk, its retries reported with its rows."""
    def retrying(error: CallError, attempt: int, delay: float) -> None:
        if progress is not None:
            progress.note(f"rows {start}-{start + inputs.rows - 1}: {error}; retry {attempt} "
                          f"of {client.retry.attempts - 1} in {delay:.1f} s")
    explanation = client.explain_inputs(model, inputs, options, timeout, retrying)
    if progress is not None:
        progress.advance(inputs.rows)
    return explanation


def collect(job: tuple[int, int, Future[Explanation]], result: Result, sink: Sink | None,
            kept: list[Explanation], keep: bool, progress: Progress | None) -> None:
    """Write one finished chunk, or record its failure."""
    start, rows, future = job
    try:
        explanation = future.result()
    except CallError as err:
        failure = Failure(start, start + rows - 1, str(err))
        result.failures.append(failure)
        if progress is not None:
            progress.note(str(failure))
        return
    if sink is not None:
        sink.write(explanation.columns(first_row=start))
    if keep:
        kept.append(explanation)
    result.rows += rows
