"""Live importance: mean |attribution| per feature over the explanations a deployment served
recently, with its standard error across rows, summed over replicas.

Each replica folds its answers into a `LiveWindow`: per wall-clock slice, the rows seen and the
sums of |phi| and |phi|^2 per feature, a row's |phi| averaged over its outputs (as attribution
drift does). Slices are cut on the wall clock, so slice k of every replica covers the same
seconds. A replica's live slices travel as a summary (a JSON header line and little-endian
float64 bytes, sha256-checked: never a pickle) that the data plane keeps in the shared store;
`combine` sums any number of them over the window asked for.

Pure numpy, no Redis or gRPC: the data plane decides what is observed and where summaries go.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument
from service.monitoring.drift import Clock, SliceRing
from service.store.backgrounds import CorruptValue, frame, little_endian, unframe

SLICES = 20  # a window is cut into this many slices: a shorter window is read to 1/20 of it
MAX_FEATURES = 4096  # per model: a summary is at most SLICES * 3 * 8 * 4096 bytes (2 MB)
FORMAT = 1


@dataclass(frozen=True)
class Slices:
    """Per-slice sums of one replica: slice ids (k,) and sums (k, 3, features), the rows being
    [rows, sum |phi|, sum |phi|^2] per feature."""

    replica: str
    slice_seconds: float
    ids: Array  # (k,) int64 wall-clock slice ids
    sums: Array  # (k, 3, features)
    written: float = 0.0  # time.time() when the summary was made


@dataclass(frozen=True)
class LiveFigures:
    """Mean |phi| per feature over a window and its standard error across rows."""

    mean_abs: Array  # (features,) 0 when no row (an answer's numbers are finite: see rows)
    std_errors: Array  # (features,) std (ddof=1) / sqrt(rows); 0 below two rows (unknown)
    rows: int
    replicas: int  # summaries with at least one row in the window
    window_seconds: float  # the window the slices read cover


class LiveWindow:
    """One model version's recent answers, in wall-clock slices of window / SLICES seconds."""

    def __init__(self, features: int, window_seconds: float, clock: Clock = time.time) -> None:
        if not 0 < features <= MAX_FEATURES:
            raise InvalidArgument(f"live importance: 1 to {MAX_FEATURES} features, got {features}")
        self.features = features
        self.slice_seconds = window_seconds / SLICES
        self._ring = SliceRing((3, features), window_seconds, self.slice_seconds, clock)

    def observe(self, phi: Array) -> None:
        """Fold attributions (rows, outputs, features) in: |phi| averaged over the outputs."""
        a = np.abs(np.asarray(phi, np.float64)).mean(axis=1)  # (rows, features)
        rows = np.full(self.features, float(a.shape[0]))
        self._ring.add(np.stack([rows, a.sum(axis=0), (a**2).sum(axis=0)]))  # (3, features)

    def now(self) -> int:
        """The current slice's id."""
        return self._ring.now()

    def slices(self, replica: str) -> Slices:
        ids, sums = self._ring.snapshot()
        return Slices(replica, self.slice_seconds, ids, sums, time.time())


def encode(s: Slices) -> bytes:
    """A summary as a framed blob: what the slices are in a JSON header, the sums as bytes."""
    sums = np.ascontiguousarray(s.sums, np.float64)
    return frame({"format": FORMAT, "replica": s.replica, "slice_seconds": s.slice_seconds,
                  "ids": [int(i) for i in s.ids], "shape": list(sums.shape),
                  "written": s.written}, little_endian(sums))


def decode(blob: bytes, where: str) -> Slices:
    """A summary back, checked (sha256, header types, shape, finite non-negative rows), or
    CorruptValue naming `where`."""
    header, payload = unframe(blob, where)
    ids, shape, step = header.get("ids"), header.get("shape"), header.get("slice_seconds")
    ok = header.get("format") == FORMAT and isinstance(ids, list) and isinstance(shape, list) \
        and all(isinstance(i, int) for i in ids) and isinstance(step, int | float) and step > 0 \
        and len(shape) == 3 and shape[:2] == [len(ids), 3] \
        and isinstance(shape[2], int) and 0 < shape[2] <= MAX_FEATURES \
        and 8 * math.prod(shape) == len(payload)
    if not ok:
        raise CorruptValue(f"{where}: live-importance summary has no valid header")
    assert isinstance(ids, list) and isinstance(shape, list) and isinstance(step, int | float)
    sums = np.frombuffer(payload, np.dtype("<f8")).reshape(shape).astype(np.float64)
    if not np.all(np.isfinite(sums)) or np.any(sums[:, 0] < 0):
        raise CorruptValue(f"{where}: live-importance summary holds invalid sums")
    written = header.get("written")
    return Slices(str(header.get("replica", "")), float(step), np.asarray(ids, np.int64), sums,
                  float(written) if isinstance(written, int | float) else 0.0)


def combine(parts: Sequence[Slices], now: int, window_seconds: float,
            slice_seconds: float) -> LiveFigures:
    """Sum the replicas' slices within the last `window_seconds` (whole slices, the current
    one included) into mean |phi| per feature and its standard error across rows."""
    keep = max(1, min(SLICES, math.ceil(window_seconds / slice_seconds - 1e-9)))
    total: Array | None = None
    replicas = 0
    for part in parts:
        live = (part.ids > now - keep) & (part.ids <= now)  # (k,)
        sums = part.sums[live].sum(axis=0)  # (3, features)
        if sums.size and sums[0].max() > 0:
            replicas += 1
            total = sums if total is None else total + sums
    features = parts[0].sums.shape[2] if parts else 0
    return figures(np.zeros((3, features)) if total is None else total, replicas,
                   keep * slice_seconds)


def figures(total: Array, replicas: int, window_seconds: float) -> LiveFigures:
    """Mean and standard error per feature from [rows, sum, sum of squares] (3, features);
    0 where there are too few rows for them (the rows say so)."""
    n, s1, s2 = total
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s1 / n  # (features,)
        var = np.maximum(s2 - n * mean**2, 0.0) / (n - 1)  # (features,) ddof=1
        se = np.where(n > 1, np.sqrt(var / n), 0.0)
    rows = int(n.max()) if n.size else 0
    return LiveFigures(np.where(n > 0, mean, 0.0), se, rows, replicas, window_seconds)
