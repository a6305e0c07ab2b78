"""Partial dependence (one feature or a pair) and ICE curves, by brute force: every visited row
is evaluated with the features set to each grid point; the PDP is the mean over the rows, an ICE
curve one row's predictions. For a classifier on a pair of features the 2-D PDP of the class
probabilities is the decision-region picture (`PartialDependence.regions`).

The default grid is scikit-learn's `partial_dependence` grid, computed the same way (its
`_grid_from_X`): a feature with fewer unique values than the resolution uses them; otherwise
`resolution` evenly spaced points between the 5th and 95th percentiles (scipy's `mquantiles`,
its default plotting positions). `spacing="quantiles"` puts the points at evenly spaced
quantile levels between the percentiles instead (equal numbers of rows between points).

Rows are visited in a seeded random order, in chunks whose batches hold at most BATCH_CELLS
elements; a job stopped by its budget reports the PDP over the rows done (a random sample), with
standard errors across rows. ICE curves are kept for the first `ice_rows` rows visited.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.stats.mstats import mquantiles

from explainers.anytime import require_rows
from explainers.base import Array, Evaluator
from explainers.errors import InvalidArgument
from explainers.global_.jobs import Control, Job, JobInfo, Meter, chunk_units, frozen

ICE_CELLS = 2**22  # ICE values per output at most (32 MB): fewer rows when the grid is big
MAX_POINTS = 2**16  # grid points at most (a 256 x 256 pair)
MIN_ROWS = 2  # the standard error needs two
SPACINGS = ("uniform", "quantiles")


@dataclass(frozen=True)
class GridSpec:
    """How each feature's axis is chosen; the defaults are scikit-learn's."""

    resolution: int = 100
    percentiles: tuple[float, float] = (0.05, 0.95)
    spacing: str = "uniform"  # or "quantiles"
    values: tuple[Array, ...] = field(default=())  # explicit axes, one per feature, instead


@dataclass(frozen=True)
class PartialDependence:
    """The PDP over the grid, its standard errors across rows, and ICE curves."""

    features: tuple[int, ...]  # the element indices varied (one or two)
    grid_values: tuple[Array, ...]  # one axis (n_k,) per feature; the grid is their product
    average: Array  # (outputs, n_1[, n_2]) mean f over the rows
    std_errors: Array  # (outputs, n_1[, n_2]) std across rows (ddof=1) / sqrt(rows)
    individual: Array  # (outputs, ice rows, n_1[, n_2]) ICE curves
    ice_rows: Array  # (ice rows,) their row indices, ascending
    rows: int  # rows averaged
    info: JobInfo

    @property
    def regions(self) -> Array:
        """The most probable output column at each grid point (n_1[, n_2]): for a classifier's
        probabilities on a pair of features, its decision regions."""
        return np.asarray(np.argmax(self.average, axis=0))


def grid_axes(X: Array, features: Sequence[int], spec: GridSpec) -> tuple[Array, ...]:
    """The grid's axis for each feature: explicit values, or computed from the rows X."""
    if spec.values:
        return _explicit(spec.values, len(features))
    _check_spec(spec)
    return tuple(_axis(np.asarray(X[:, f], np.float64), spec) for f in features)


def partial_dependence(model: Evaluator, X: Array, features: Sequence[int],
                       rng: np.random.Generator, grid: GridSpec | None = None,
                       ice_rows: int = 100,
                       control: Control | None = None) -> Job[PartialDependence]:
    """PDP and ICE of f on X (rows, elements) for one feature or a pair; the grid comes from all
    of X, the averages from the rows visited (all, or a seeded sample of max_rows)."""
    ctl = control or Control()
    data, feats = _checked(X, features)
    axes = grid_axes(data, feats, grid or GridSpec())
    points = _product(axes)  # (points, features)
    if ice_rows < 0:
        raise InvalidArgument("ice_rows: must be >= 0")
    order = ctl.visit_order(data.shape[0], rng)  # (rows,)
    keep = min(ice_rows, order.size, ICE_CELLS // max(1, points.shape[0]))
    require_rows(model, ctl.budget, min(MIN_ROWS, order.size) * points.shape[0],
                 "partial dependence on two rows")
    acc, meter = _Accumulator(points.shape[0], keep), Meter(order.size, "rows")
    yield meter.progress()
    stopped = yield from _visit(model, data, feats, points, order, ctl, acc, meter)
    return acc.result(feats, axes, order, meter.info(model, stopped, acc.notes(ice_rows)))


def _checked(X: Array, features: Sequence[int]) -> tuple[Array, tuple[int, ...]]:
    """The rows as floats and the features, checked: one or two distinct columns, finite."""
    data = np.asarray(X, np.float64)
    feats = tuple(int(f) for f in features)
    if data.ndim != 2 or data.shape[0] < MIN_ROWS:
        raise InvalidArgument(f"x: at least {MIN_ROWS} rows (rows, elements) needed, got shape "
                              f"{data.shape}")
    if len(feats) not in (1, 2) or len(set(feats)) != len(feats) \
            or not all(0 <= f < data.shape[1] for f in feats):
        raise InvalidArgument(f"features: one or two distinct columns in 0..{data.shape[1] - 1},"
                              f" got {list(feats)}")
    if not np.all(np.isfinite(data[:, list(feats)])):
        raise InvalidArgument("x: the features of a partial dependence must be finite")
    return data, feats


def _check_spec(spec: GridSpec) -> None:
    lo, hi = spec.percentiles
    if not 0 <= lo < hi <= 1:
        raise InvalidArgument("grid.percentiles: two levels with 0 <= low < high <= 1")
    if spec.resolution < 2:
        raise InvalidArgument("grid.resolution: at least 2")
    if spec.spacing not in SPACINGS:
        raise InvalidArgument(f"grid.spacing: one of {', '.join(SPACINGS)}")


def _explicit(values: tuple[Array, ...], features: int) -> tuple[Array, ...]:
    """Given axes: one finite, non-empty 1-D array per feature."""
    axes = tuple(np.asarray(v, np.float64) for v in values)
    if len(axes) != features or any(a.ndim != 1 or a.size == 0 or not np.all(np.isfinite(a))
                                    for a in axes):
        raise InvalidArgument(f"grid.values: one finite, non-empty axis per feature ({features})")
    return axes


def _axis(column: Array, spec: GridSpec) -> Array:
    """One feature's axis, as scikit-learn's _grid_from_X builds it (or at quantile levels)."""
    uniques = np.unique(column)
    if uniques.size < spec.resolution:
        return uniques
    lo, hi = np.asarray(mquantiles(column, prob=spec.percentiles, axis=0), np.float64)
    if np.allclose(lo, hi):
        raise InvalidArgument("grid.percentiles: the feature's percentiles are too close to "
                              "build a grid; choose levels further apart")
    if spec.spacing == "uniform":
        return np.linspace(lo, hi, num=spec.resolution, endpoint=True)
    levels = np.linspace(*spec.percentiles, num=spec.resolution)
    return np.unique(np.asarray(mquantiles(column, prob=levels, axis=0), np.float64))


def _product(axes: tuple[Array, ...]) -> Array:
    """The grid points (points, features), the first feature varying slowest."""
    size = int(np.prod([a.size for a in axes]))
    if size > MAX_POINTS:
        raise InvalidArgument(f"grid: {size} points, at most {MAX_POINTS}")
    mesh = np.meshgrid(*axes, indexing="ij")
    return np.stack([m.ravel() for m in mesh], axis=1)


class _Accumulator:
    """Running mean and spread of f per grid point over the rows done (Chan's pairwise update,
    stable for any chunking), and the ICE curves of the first rows visited."""

    def __init__(self, points: int, ice: int) -> None:
        self.points, self.ice, self.count = points, ice, 0
        self.mean: Array | None = None  # (points, outputs)
        self.m2: Array | None = None  # (points, outputs) sum of squared deviations
        self.curves: Array | None = None  # (ice, points, outputs)

    def add(self, preds: Array) -> None:
        """Fold in the predictions (rows, points, outputs) of the next rows visited."""
        if self.mean is None or self.m2 is None or self.curves is None:
            outputs = preds.shape[2]
            self.mean, self.m2 = np.zeros((self.points, outputs)), np.zeros((self.points, outputs))
            self.curves = np.empty((self.ice, self.points, outputs))
        n, m = self.count, preds.shape[0]
        mean_b = preds.mean(axis=0)  # (points, outputs)
        delta = mean_b - self.mean
        self.mean += delta * (m / (n + m))
        self.m2 += ((preds - mean_b) ** 2).sum(axis=0) + delta**2 * (n * m / (n + m))
        take = max(0, min(m, self.ice - n))
        self.curves[n:n + take] = preds[:take]
        self.count = n + m

    def notes(self, asked: int) -> tuple[str, ...]:
        if self.ice >= asked or self.count <= self.ice:
            return ()
        return (f"ice_rows: {self.ice} curves kept (at most {ICE_CELLS} values per output)",)

    def result(self, feats: tuple[int, ...], axes: tuple[Array, ...], order: Array,
               info: JobInfo) -> PartialDependence:
        """Arrays laid out like scikit-learn's: outputs first, then rows, then the grid axes."""
        assert self.mean is not None and self.m2 is not None and self.curves is not None
        shape = tuple(a.size for a in axes)
        outputs = self.mean.shape[1]
        se = np.sqrt(self.m2 / (self.count - 1) / self.count)  # (points, outputs)
        kept = min(self.ice, self.count)
        rank = np.argsort(order[:kept])  # ICE rows ascending by index
        ice = self.curves[:kept][rank].transpose(2, 0, 1).reshape(outputs, kept, *shape)
        return PartialDependence(feats, tuple(frozen(a) for a in axes),
                                 frozen(self.mean.T.reshape(outputs, *shape)),
                                 frozen(se.T.reshape(outputs, *shape)), frozen(ice),
                                 frozen(order[:kept][rank]), self.count, info)


def _visit(model: Evaluator, data: Array, feats: tuple[int, ...], points: Array, order: Array,
           control: Control, acc: _Accumulator, meter: Meter) -> Job[str]:
    """Evaluate the rows in `order`, chunk by chunk, into the accumulator; returns why it
    stopped early ("" when every row was done)."""
    while acc.count < order.size:
        control.check()
        step = chunk_units(model, points.shape[0] * data.shape[1], points.shape[0])  # rows
        rows = order[acc.count:acc.count + step]
        stopped = control.out_of_budget(model, rows.size * points.shape[0])
        if stopped and acc.count >= MIN_ROWS:
            return stopped
        acc.add(_predictions(model, data[rows], feats, points, control))
        yield from meter.advance(rows.size)
    return ""


def _predictions(model: Evaluator, rows: Array, feats: tuple[int, ...], points: Array,
                 control: Control) -> Array:
    """f of each row with its features set to each grid point: (rows, points, outputs), the
    points in batches of at most BATCH_CELLS elements."""
    step = chunk_units(model, rows.size, rows.shape[0])  # points per batch
    parts = []
    for start in range(0, points.shape[0], step):
        if start:
            control.check()
        chunk = points[start:start + step]  # (batch points, features)
        batch = np.repeat(rows[None], chunk.shape[0], axis=0)  # (points, rows, elements)
        batch[:, :, list(feats)] = chunk[:, None, :]
        pred = model(batch.reshape(-1, rows.shape[1]))  # (points * rows, outputs)
        parts.append(pred.reshape(chunk.shape[0], rows.shape[0], -1))
    return np.concatenate(parts).transpose(1, 0, 2)  # (rows, points, outputs)
