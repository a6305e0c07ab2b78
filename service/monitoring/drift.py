"""Drift statistics for the hot path: recent inputs, outputs and attributions against a reference.

Pure numpy, no global state, no Prometheus or gRPC: the metrics module reads the frozen results
and sets gauges. Every window is a ring of per-slice accumulators that expire by time, so memory
is bounded by (slices, features, bins) whatever the traffic.

Definitions (all per feature, or per output for prediction drift):

* Bins: right-closed, (e[k], e[k+1]], on the reference's quantile edges (deduplicated, so a discrete
  feature gets one bin per frequent value), with -inf and +inf outer edges so every value lands in
  a bin (+inf in the last). NaN values are not counted.
* PSI = sum_k (p_k - q_k) ln(p_k / q_k), p = window shares, q = reference shares, each clipped
  below at `PSI_EPSILON` (1e-4, no renormalisation). A bin empty on both sides adds exactly 0; a
  bin holding a share m on one side only adds (m - 1e-4) ln(m / 1e-4): about 0.05 for m = 0.01 and
  0.69 for m = 0.1.
* Binned KS = max over the interior edges e of |F_window(e) - F_reference(e)|, F(e) = P(X <= e).
  Each term is one value of |F_window - F_reference|, so it is a lower bound of the exact
  two-sample KS statistic. It is exactly the KS statistic of the samples after each value is moved
  to the right edge of its bin, so it equals the exact one when every value of both samples
  already sits on an interior edge (e.g. a discrete feature whose values all became edges).
* Attribution drift: per feature, ratio = window mean |phi| / reference mean |phi| (1 = unchanged,
  1.0 when both are 0, +inf when only the reference is 0); shift = (window - reference) mean |phi|
  / the reference's total mean |phi| over all features, the share of the explanation that moved
  to (+) or from (-) the feature (0 when unchanged, +inf when the whole reference is 0), which
  unlike the ratio stays small for features that barely matter; rank change = the top-k turnover
  described in `top_k_change`, in [0, 1], 0 = same top-k.
* An empty window (no observation of a feature in the last `window_seconds`) gives NaN, never 0:
  "no data" must not read as "no drift".
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Generic, TypeVar

import numpy as np

from explainers.errors import InvalidArgument

Array = np.ndarray
Clock = Callable[[], float]
T = TypeVar("T")

PSI_EPSILON = 1e-4
"""Floor on bin shares in the PSI, so an empty bin gives a large but finite term."""

_NEVER = np.iinfo(np.int64).min  # slice id of a ring position that has never been written


def _frozen(array: Array) -> Array:
    """A read-only float64 copy, so a result cannot be changed after it is returned."""
    out = np.array(array, dtype=np.float64, copy=True)
    out.setflags(write=False)
    return out


def _matrix(data: Array, name: str, columns: int | None = None) -> Array:
    """`data` as float64 (rows, columns); a 1-D array is one row."""
    X = np.asarray(data, dtype=np.float64)
    X = X[np.newaxis, :] if X.ndim == 1 else X  # (rows, columns)
    if X.ndim != 2 or (columns is not None and X.shape[1] != columns):
        want = "columns" if columns is None else f"{columns} columns"
        raise InvalidArgument(f"{name}: expected a (rows, {want}) matrix, got shape {X.shape}")
    return X


# ---------------------------------------------------------------------------------------- binning


def _edges(column: Array, weights: Array | None, bins: int) -> Array:
    """-inf, the distinct reference quantiles at 1/bins .. (bins-1)/bins, +inf."""
    keep = ~np.isnan(column)  # (rows,)
    if not keep.any():
        raise InvalidArgument("reference: a column has no non-NaN value")
    w = None if weights is None else weights[keep]
    levels = np.arange(1, bins) / bins  # (bins - 1,)
    inner = np.quantile(column[keep], levels, method="inverted_cdf", weights=w)
    return np.unique(np.concatenate(([-np.inf], inner, [np.inf])))  # (bins_j + 1,)


def _interior(edges: tuple[Array, ...], width: int) -> Array:
    """Interior edges per feature, padded with +inf to (features, width - 1): no value is above
    a padding edge, so padding bins stay empty."""
    inner = np.full((len(edges), width - 1), np.inf)  # (features, width - 1)
    for j, e in enumerate(edges):
        inner[j, :e.size - 2] = e[1:-1]
    return inner


def _bin_index(inner: Array, X: Array) -> Array:
    """Bin of each value, (rows, features): how many interior edges lie strictly below it
    (searchsorted side='left'; padding edges are +inf, so they never count)."""
    out = np.empty(X.shape, dtype=np.intp)  # (rows, features)
    for j in range(X.shape[1]):
        out[:, j] = np.searchsorted(inner[j], X[:, j], side="left")
    return out


def _histogram(inner: Array, X: Array, weights: Array | None) -> Array:
    """(Weighted) counts per (feature, bin) on padded interior edges; NaN not counted."""
    features, width = inner.shape[0], inner.shape[1] + 1
    flat = _bin_index(inner, X) + np.arange(features) * width  # (rows, features)
    keep = ~np.isnan(X)  # (rows, features)
    w = None if weights is None else np.broadcast_to(weights[:, np.newaxis], X.shape)[keep]
    counts = np.bincount(flat[keep], weights=w, minlength=features * width)
    return counts.astype(np.float64).reshape(features, width)  # (features, bins)


def _cdf(counts: Array) -> Array:
    """Cumulative shares per bin, (features, bins); NaN rows where a feature has no count."""
    cum = np.cumsum(counts, axis=-1)  # (features, bins)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(cum / cum[..., -1:])


def _shares(counts: Array) -> Array:
    """Shares per bin, (features, bins); NaN rows where a feature has no count."""
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.asarray(counts / counts.sum(axis=-1, keepdims=True))


@dataclass(frozen=True)
class Reference:
    """Fixed per-feature bins and the reference's shares and CDF on them, built once per model.

    Bins are (edges[j][k], edges[j][k+1]]; arrays are padded to the widest feature's bin count
    with share 0 and CDF 1, which leaves both statistics unchanged.
    """

    edges: tuple[Array, ...]  # per feature (bins_j + 1,): -inf, quantiles, +inf
    proportions: Array  # (features, bins) reference share per bin
    cdf: Array  # (features, bins) P_ref(X <= right edge of the bin)

    @staticmethod
    def build(data: Array, bins: int = 10, weights: Array | None = None) -> Reference:
        """Quantile bins from reference rows (rows, features), optionally weighted (rows,)."""
        X = _matrix(data, "reference")  # (rows, features)
        w = _reference_weights(weights, X.shape[0])
        if bins < 1 or X.shape[0] == 0:
            raise InvalidArgument("reference: needs at least one row and at least one bin")
        edges = tuple(_frozen(_edges(X[:, j], w, bins)) for j in range(X.shape[1]))
        inner = _interior(edges, max(e.size for e in edges) - 1)
        counts = _histogram(inner, X, w)  # (features, bins)
        return Reference(edges, _frozen(_shares(counts)), _frozen(_cdf(counts)))

    @property
    def features(self) -> int:
        return len(self.edges)

    @property
    def bins(self) -> int:
        """Width of the padded (features, bins) arrays: the largest per-feature bin count."""
        return int(self.proportions.shape[1])

    @cached_property
    def interior(self) -> Array:
        """(features, bins - 1) interior edges padded with +inf: binning in one comparison."""
        return _frozen(_interior(self.edges, self.bins))

    def histogram(self, X: Array) -> Array:
        """Counts of the rows of X (rows, features) per (feature, bin), all features at once."""
        return _histogram(self.interior, _matrix(X, "X", self.features), None)


def _reference_weights(weights: Array | None, rows: int) -> Array | None:
    """Validated non-negative row weights, or None for equal weights."""
    if weights is None:
        return None
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (rows,) or np.any(~np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InvalidArgument("reference: weights need one finite, non-negative value per row")
    return w


# ------------------------------------------------------------------------------------- statistics


def population_stability_index(p: Array, q: Array, epsilon: float = PSI_EPSILON) -> Array:
    """PSI over the last axis of two share arrays, both clipped below at `epsilon`."""
    p_, q_ = np.maximum(p, epsilon), np.maximum(q, epsilon)  # (..., bins)
    return np.asarray(np.sum((p_ - q_) * np.log(p_ / q_), axis=-1))


def binned_ks(cdf_a: Array, cdf_b: Array) -> Array:
    """Largest CDF gap over the last axis: the KS statistic restricted to the bin edges."""
    return np.asarray(np.max(np.abs(cdf_a - cdf_b), axis=-1))


@dataclass(frozen=True)
class DriftStats:
    """Per-feature PSI and binned KS of a window against its reference; NaN where no data."""

    psi: Array  # (features,)
    ks: Array  # (features,)
    observations: Array  # (features,) non-NaN values in the window


def drift_stats(reference: Reference, counts: Array, epsilon: float = PSI_EPSILON) -> DriftStats:
    """PSI and binned KS of window counts (features, bins) against `reference`."""
    psi = population_stability_index(_shares(counts), reference.proportions, epsilon)
    ks = binned_ks(_cdf(counts), reference.cdf)  # (features,)
    return DriftStats(_frozen(psi), _frozen(ks), _frozen(counts.sum(axis=-1)))


# ------------------------------------------------------------------------------------------ window


class SliceRing:
    """Per-slice accumulators over a sliding time window: O(1) expiry and bounded memory.

    Holds the current (partial) slice and the `slices - 1` before it, slices =
    ceil(window / slice), so it covers between (slices - 1) and `slices` slices of history.
    """

    def __init__(self, shape: tuple[int, ...], window_seconds: float, slice_seconds: float,
                 clock: Clock) -> None:
        if not 0 < slice_seconds <= window_seconds < math.inf:
            raise ValueError("drift window: need 0 < slice_seconds <= window_seconds < inf")
        self.slices = math.ceil(window_seconds / slice_seconds - 1e-9)
        self._slice_seconds = slice_seconds
        self._clock = clock
        self._data = np.zeros((self.slices, *shape))  # (slices, *shape)
        self._ids = np.full(self.slices, _NEVER, dtype=np.int64)  # (slices,) slice id per slot
        self._lock = threading.Lock()

    def now(self) -> int:
        """The current slice's id."""
        return math.floor(self._clock() / self._slice_seconds)

    def add(self, delta: Array, at: int | None = None) -> None:
        """Add `delta` (*shape) to slice `at` (default: the current one), first recycling its
        slot if stale; dropped if that slice has already left the window."""
        with self._lock:
            now = self.now()
            at = now if at is None else at
            slot = at % self.slices
            if at <= now - self.slices or self._ids[slot] > at:
                return  # expired: its slot already serves a newer slice, or soon will
            if self._ids[slot] != at:
                self._data[slot] = 0.0
                self._ids[slot] = at
            self._data[slot] += delta

    def total(self) -> Array:
        """Sum (*shape) of the slices still inside the window."""
        return np.asarray(self.snapshot()[1].sum(axis=0))

    def snapshot(self) -> tuple[Array, Array]:
        """The slices still inside the window: their ids (k,) and a copy of their sums
        (k, *shape), oldest first."""
        with self._lock:
            now = self.now()
            live = (self._ids > now - self.slices) & (self._ids <= now)  # (slices,)
            order = np.argsort(self._ids[live])
            return self._ids[live][order], self._data[live][order]


class DriftWindow:
    """Bin counts of recent rows (inputs, or model outputs for prediction drift) over time."""

    def __init__(self, reference: Reference, window_seconds: float = 300.0,
                 slice_seconds: float = 5.0, clock: Clock = time.monotonic) -> None:
        self.reference = reference
        self._ring = SliceRing((reference.features, reference.bins), window_seconds, slice_seconds,
                           clock)

    def observe(self, X: Array, at: int | None = None) -> None:
        """Count rows X (rows, features), or one row (features,), in slice `at` (default: now);
        binning runs outside the lock."""
        counts = self.reference.histogram(X)  # (features, bins)
        self._ring.add(counts, at)

    def slice_now(self) -> int:
        """The id of the current time slice (for `observe(..., at=)`)."""
        return self._ring.now()

    def counts(self) -> Array:
        """Bin counts (features, bins) of the live window."""
        return self._ring.total()

    def stats(self, epsilon: float = PSI_EPSILON) -> DriftStats:
        """PSI and binned KS of the live window; NaN for features with no observation."""
        return drift_stats(self.reference, self.counts(), epsilon)


# ------------------------------------------------------------------------------------ attributions


def mean_abs_attribution(phi: Array) -> Array:
    """Mean |phi| per feature of rows (rows, features), NaN ignored: the attribution reference."""
    a = np.abs(_matrix(phi, "attributions"))  # (rows, features)
    kept = np.sum(~np.isnan(a), axis=0)  # (features,)
    return np.asarray(np.nansum(a, axis=0) / np.maximum(kept, 1))  # (features,)


def _top_k_membership(values: Array, k: int) -> Array:
    """Each feature's share of a top-k seat: 1 above the k-th largest, ties at it share the rest."""
    v = np.where(np.isnan(values), -np.inf, values)  # (features,)
    kth = np.sort(v)[::-1][k - 1]
    above, tied = v > kth, v == kth  # (features,)
    return np.asarray(above + tied * ((k - above.sum()) / tied.sum()))  # (features,) sums to k


def top_k_change(reference: Array, window: Array, k: int) -> float:
    """1 - (fractional overlap of the two top-k sets) / k, in [0, 1]; 0 = same top-k set.

    Ties at the k-th value share the remaining seats equally, so the score does not depend on
    feature order: it equals sum |m_ref - m_win| / (2k) over the fractional memberships m.
    """
    k = min(k, reference.size)
    overlap = np.minimum(_top_k_membership(reference, k), _top_k_membership(window, k)).sum()
    return float(np.clip(1.0 - overlap / k, 0.0, 1.0))


@dataclass(frozen=True)
class AttributionDriftStats:
    """Window mean |phi| against the reference's: per-feature ratio and shift, top-k turnover."""

    mean_abs: Array  # (features,) window mean |phi|, NaN where no observation
    ratio: Array  # (features,) window / reference mean |phi|
    rank_change: float  # [0, 1] top-k turnover, NaN for an empty window
    observations: Array  # (features,) non-NaN attributions in the window
    shift: Array  # (features,) (window - reference) mean |phi| / reference total mean |phi|


def attribution_shift(reference_mean_abs: Array, mean_abs: Array) -> Array:
    """(window - reference) mean |phi| per feature over the reference's total: 0 when equal, NaN
    where the window has no observation, +-inf when the reference is all 0."""
    total = reference_mean_abs.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = (mean_abs - reference_mean_abs) / total  # (features,)
    return np.asarray(np.where(mean_abs == reference_mean_abs, 0.0, shift))


def attribution_drift(reference_mean_abs: Array, sums: Array, observations: Array,
                      top_k: int) -> AttributionDriftStats:
    """Drift from per-feature sums of |phi| and counts (features,) of a window."""
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = sums / observations  # (features,)
        ratio = np.where((reference_mean_abs == 0) & (mean == 0), 1.0, mean / reference_mean_abs)
    empty = not np.any(observations > 0)
    rank = math.nan if empty else top_k_change(reference_mean_abs, mean, top_k)
    shift = attribution_shift(reference_mean_abs, mean)
    return AttributionDriftStats(_frozen(mean), _frozen(ratio), rank, _frozen(observations),
                                 _frozen(shift))


class AttributionWindow:
    """Sums of |phi| and counts per feature of recent explanations, on the same time ring."""

    def __init__(self, reference_mean_abs: Array, top_k: int = 5, window_seconds: float = 300.0,
                 slice_seconds: float = 5.0, clock: Clock = time.monotonic) -> None:
        ref = np.asarray(reference_mean_abs, dtype=np.float64)
        if ref.ndim != 1 or ref.size == 0 or np.any(~np.isfinite(ref)) or np.any(ref < 0):
            raise InvalidArgument("attribution reference: needs finite mean |phi| >= 0 per feature")
        if top_k < 1:
            raise ValueError("attribution drift: top_k must be at least 1")
        self.reference_mean_abs = _frozen(ref)
        self.top_k = top_k
        self._ring = SliceRing((2, ref.size), window_seconds, slice_seconds, clock)

    def observe(self, phi: Array, at: int | None = None) -> None:
        """Fold attributions (rows, features), or one row (features,), into slice `at` (default:
        the current one)."""
        a = np.abs(_matrix(phi, "attributions", self.reference_mean_abs.size))  # (rows, features)
        keep = ~np.isnan(a)  # (rows, features)
        delta = np.stack([np.where(keep, a, 0.0).sum(axis=0), keep.sum(axis=0)])  # (2, features)
        self._ring.add(delta, at)

    def stats(self) -> AttributionDriftStats:
        """Ratio and top-k change of the live window; NaN when it is empty."""
        sums, observations = self._ring.total()  # (features,) each
        return attribution_drift(self.reference_mean_abs, sums, observations, self.top_k)


# ------------------------------------------------------------------------------------------- reads


class Cached(Generic[T]):
    """The last result of `compute`, recomputed only when older than `every_seconds`.

    Metric scrapes call `get()` as often as they like; the windows are summed at most once per
    interval. Its own lock, so a recompute never blocks `observe`.
    """

    def __init__(self, compute: Callable[[], T], every_seconds: float = 5.0,
                 clock: Clock = time.monotonic) -> None:
        self._compute = compute
        self.every_seconds = every_seconds
        self._clock = clock
        self._last: tuple[float, T] | None = None
        self._lock = threading.Lock()

    def get(self) -> T:
        """The cached value, recomputed first if more than `every_seconds` have passed."""
        with self._lock:
            now = self._clock()
            if self._last is None or now - self._last[0] > self.every_seconds:
                self._last = (now, self._compute())
            return self._last[1]


@dataclass(frozen=True)
class DriftReport:
    """Everything the metrics module exports for one model; None for what is not monitored."""

    features: DriftStats
    predictions: DriftStats | None
    attributions: AttributionDriftStats | None


@dataclass
class _Batch:
    """Rows queued in one time slice, binned together: per-request cost is a few appends."""

    at: int  # the slice the rows arrived in
    X: list[Array] = field(default_factory=list)  # (rows, features) blocks
    predictions: list[Array] = field(default_factory=list)  # (rows, outputs) blocks
    attributions: list[Array] = field(default_factory=list)  # (rows, [outputs,] features) blocks
    rows: int = 0


class DriftMonitor:
    """One model's input, prediction and attribution drift: cheap observe, cached report.

    `observe` only queues rows; they are binned in one vectorised pass per `batch_rows` rows, per
    time slice (into the slice they arrived in) and before every report, so a one-row request
    costs a lock and a few list appends instead of three histograms.
    """

    def __init__(self, features: Reference, predictions: Reference | None = None,
                 attribution_reference: Array | None = None, *, top_k: int = 5,
                 window_seconds: float = 300.0, slice_seconds: float = 5.0,
                 every_seconds: float = 5.0, clock: Clock = time.monotonic,
                 batch_rows: int = 256) -> None:
        span = (window_seconds, slice_seconds)
        self.features = DriftWindow(features, *span, clock)
        self.predictions = None if predictions is None else DriftWindow(predictions, *span, clock)
        self.attributions = (None if attribution_reference is None else
                             AttributionWindow(attribution_reference, top_k, *span, clock))
        self.batch_rows = batch_rows
        self._batch: _Batch | None = None
        self._lock = threading.Lock()
        self._report = Cached(self._compute, every_seconds, clock)

    def observe(self, X: Array, predictions: Array | Sequence[Array] | None = None,
                attributions: Array | Sequence[Array] | None = None) -> None:
        """Queue one request: inputs X (rows, features) or one row (features,); predictions
        (rows, outputs); attributions (rows, features), or per row (outputs, features) whose |phi|
        is averaged over outputs (the same kind every call). Unmonitored parts are ignored."""
        X = _matrix(X, "X", self.features.reference.features)  # (rows, features)
        with self._lock:
            at = self.features.slice_now()
            done = self._batch
            if done is None or done.at != at or done.rows >= self.batch_rows:
                self._batch = _Batch(at)
            else:
                done = None
            batch = self._batch
            assert batch is not None
            batch.X.append(X)
            batch.rows += X.shape[0]
            if predictions is not None and self.predictions is not None:
                batch.predictions.append(np.asarray(predictions, np.float64))
            if attributions is not None and self.attributions is not None:
                batch.attributions.append(np.asarray(attributions, np.float64))
        if done is not None:
            self._fold(done)

    def flush(self) -> None:
        """Bin every queued row now."""
        with self._lock:
            done, self._batch = self._batch, None
        if done is not None:
            self._fold(done)

    def _fold(self, batch: _Batch) -> None:
        """Bin a batch into the slice its rows arrived in, one histogram per window."""
        self.features.observe(np.concatenate(batch.X), batch.at)
        if batch.predictions and self.predictions is not None:
            self.predictions.observe(np.concatenate(batch.predictions), batch.at)  # (rows, out.)
        if batch.attributions and self.attributions is not None:
            phi = np.abs(np.concatenate(batch.attributions))  # (rows, [outputs,] features)
            self.attributions.observe(phi.mean(axis=1) if phi.ndim == 3 else phi, batch.at)

    def report(self) -> DriftReport:
        """Statistics at most `every_seconds` old."""
        return self._report.get()

    def _compute(self) -> DriftReport:
        self.flush()
        return DriftReport(self.features.stats(),
                           None if self.predictions is None else self.predictions.stats(),
                           None if self.attributions is None else self.attributions.stats())
