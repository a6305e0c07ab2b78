"""The small contract every estimator follows: inputs, budget and the frozen result."""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np
from scipy import stats

from explainers.errors import InvalidArgument
from explainers.groups import Groups

Array = np.ndarray
ModelFn = Callable[[Array], Array]
"""A model as estimators see it: (rows, elements) -> (rows, outputs) float64, every input
flattened and concatenated into one element axis."""


def _frozen(array: Array, dtype: type = np.float64) -> Array:
    """A read-only float copy, so a result cannot be changed after it is returned."""
    out: Array = np.array(array, dtype=dtype, copy=True)
    out.setflags(write=False)
    return out


@functools.lru_cache(maxsize=4096)
def t_quantile(level: float, dof: float) -> float:
    """Student-t quantile for a two-sided interval (normal when dof is infinite). Cached: scipy
    takes ~0.4 ms a call, which was 10x the work of a 256-row linear or tree answer."""
    q = 0.5 + level / 2
    return float(stats.norm.ppf(q) if not math.isfinite(dof) else stats.t.ppf(q, max(dof, 1.0)))


def t_quantiles(level: float, dofs: Array) -> Array:
    """t_quantile for an array of degrees of freedom (inf gives the normal quantile)."""
    return np.asarray(stats.t.ppf(0.5 + level / 2, np.maximum(dofs, 1.0)))


@dataclass(frozen=True)
class Background:
    """Reference rows with weights that sum to one, and the model's outputs on them.

    `predictions` (rows, outputs) are computed once per model and background and reused by every
    request, so E[f(background)] is never recomputed on the hot path.
    """

    data: Array  # (rows, features)
    weights: Array  # (rows,)
    predictions: Array  # (rows, outputs)

    @staticmethod
    def build(data: Array, predictions: Array, weights: Array | None = None) -> Background:
        """Validate shapes and normalise the weights."""
        rows = data.shape[0]
        w = np.full(rows, 1.0 / rows) if weights is None else np.asarray(weights, np.float64)
        if rows == 0 or w.shape != (rows,) or predictions.shape[0] != rows or np.any(w < 0):
            raise InvalidArgument("background: needs at least one row and one weight per row")
        return Background(_frozen(data), _frozen(w / w.sum()), _frozen(predictions))

    @property
    def rows(self) -> int:
        return int(self.data.shape[0])

    @property
    def base_values(self) -> Array:
        """E[f(background)] per output, weighted."""
        return np.asarray(self.weights @ self.predictions)  # (outputs,)


@dataclass(frozen=True)
class Budget:
    """When an estimator must stop: a monotonic deadline, an evaluation cap, an accuracy goal."""

    deadline: float  # time.monotonic() seconds; math.inf = no time limit
    max_evaluations: int | None = None
    target_error: float | None = None

    @staticmethod
    def of_seconds(seconds: float, **kwargs: int | float | None) -> Budget:
        return Budget(time.monotonic() + seconds, **kwargs)  # type: ignore[arg-type]

    def remaining(self) -> float:
        """Seconds left (negative once past the deadline)."""
        return self.deadline - time.monotonic()


# Never plan to use more than this share of the remaining time: leaves room for the solve,
# serialisation and the noise in the throughput estimate.
SAFETY = 0.8


class Evaluator:
    """Evaluates any batch in bounded chunks, counts rows and learns rows/second as it goes.

    One per request: the data plane seeds it with the throughput measured when the model loaded,
    so the first round is planned from a real figure rather than a guess. `pause`, called before
    every model call, is where the caller's scheduler may hold the call back (a more urgent call
    takes the core) or stop it (raising: the client went away, the server is stopping).
    `wall_factors` carry what whole answers cost per model second, per method, as measured.
    """

    def __init__(self, fn: ModelFn, chunk_rows: int = 4096, rows_per_second: float = 1e5,
                 call_overhead_s: float = 5e-5, dtype: type = np.float64,
                 pause: Callable[[], None] | None = None,
                 wall_factors: Mapping[str, float] | None = None,
                 path_major: bool = False) -> None:
        self._fn = fn
        self.pause = pause
        # per method: its wall time over its model time, as the caller measured it on this
        # model's earlier answers (building batches, sums, waiting for a core)
        self.wall_factors = dict(wall_factors or {})
        self.dtype = dtype  # masked batches are built in the model's input type: no extra cast
        # feed permutation paths one after the other (consecutive rows alike): tree ensembles
        # run 15-45% faster on such batches; other models get the cheaper step-major build
        self.path_major = path_major
        self.chunk_rows = max(1, int(chunk_rows))
        self.rows_per_second = float(rows_per_second)
        self.call_overhead_s = call_overhead_s
        self.evaluations = 0

    def __call__(self, X: Array) -> Array:
        """f(X) for X (rows, features), in chunks of at most `chunk_rows` rows."""
        if X.shape[0] == 0:
            return np.empty((0, 0))
        step = self.chunk_rows
        parts = [self._timed(X[i:i + step]) for i in range(0, X.shape[0], step)]
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def _timed(self, X: Array) -> Array:
        """One model call; folds its measured speed into the running estimate."""
        if self.pause is not None:
            self.pause()
        start = time.perf_counter()
        y = self._fn(X)
        elapsed = time.perf_counter() - start
        self.evaluations += X.shape[0]
        if X.shape[0] >= 64 and elapsed > 0:  # tiny calls measure overhead, not throughput
            # the overhead is a guess: a call faster than twice it says little beyond "fast",
            # so at most half of what was measured is taken off (never rows / 1 ns)
            rate = X.shape[0] / max(elapsed - self.call_overhead_s, 0.5 * elapsed)
            self.rows_per_second = 0.7 * self.rows_per_second + 0.3 * rate
        return y

    def seconds_for(self, rows: int) -> float:
        """Predicted wall time to evaluate `rows` rows."""
        calls = -(-rows // self.chunk_rows)
        return rows / self.rows_per_second + calls * self.call_overhead_s

    def wall_seconds(self, method: str, rows: int, prior: float = 1.0) -> float:
        """Predicted wall time of `method` evaluating `rows` rows: the model's time times the
        method's measured wall factor (`prior` before any was measured)."""
        return self.seconds_for(rows) * self.wall_factors.get(method, prior)

    def affordable_rows(self, budget: Budget) -> int:
        """Rows that fit in the budget's remaining time and evaluation cap."""
        remaining = budget.remaining() * SAFETY
        by_time = int(remaining * self.rows_per_second) if np.isfinite(remaining) else 2**62
        cap = 2**62 if budget.max_evaluations is None else budget.max_evaluations - self.evaluations
        return max(0, min(by_time, cap))


@dataclass(frozen=True)
class Explanation:
    """One row's attributions, one per player (feature or group). Arrays are read-only;
    std_errors are 0 for exact methods."""

    method: str
    values: Array  # (outputs, players)
    std_errors: Array  # (outputs, players)
    base_values: Array  # (outputs,)
    prediction: Array  # (outputs,)
    evaluations: int
    converged: bool
    budget_exhausted: bool
    samples: int = 0  # sampling units used (permutation pairs, coalition pairs); 0 = exact
    # (an exact method's std_errors are all 0; metrics rely on it)
    dof: float = math.inf  # degrees of freedom of the standard errors (for t intervals)
    notes: tuple[str, ...] = field(default=())
    dofs: Array | None = None  # (outputs, players) per-attribution dof; overrides `dof`
    # (outputs, elements) a map shaped like the input, when it is not each element's group value
    # (occlusion averages overlapping windows); None = derive it from the groups
    map: Array | None = None
    # sum(values) == prediction - base_values by construction (the data plane checks it)
    additive: bool = True
    # method-specific measures of the answer's quality or cost (e.g. a surrogate's weighted R^2)
    diagnostics: tuple[tuple[str, float], ...] = ()

    @staticmethod
    def build(method: str, values: Array, std_errors: Array, base: Array, pred: Array,
              **meta: object) -> Explanation:
        """Freeze the arrays; every estimator returns through here."""
        for key in ("dofs", "map"):
            if isinstance(meta.get(key), np.ndarray):
                meta[key] = _frozen(meta[key])  # type: ignore[arg-type]
        return Explanation(method, _frozen(values), _frozen(std_errors), _frozen(base),
                           _frozen(pred), **meta)  # type: ignore[arg-type]

    def interval(self, level: float = 0.95) -> tuple[Array, Array]:
        """Two-sided t interval per attribution; zero width for exact methods."""
        q = t_quantile(level, self.dof) if self.dofs is None else t_quantiles(level, self.dofs)
        half = q * self.std_errors  # (outputs, features)
        return self.values - half, self.values + half

    @property
    def additivity_gap(self) -> Array:
        """prediction - base - sum(attributions) per output: 0 for additive methods."""
        return np.asarray(self.prediction - self.base_values - self.values.sum(axis=1))


class Estimator(Protocol):
    """An attribution method: validates in `explain`, computes in a private `_explain`."""

    name: str

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Attributions of f(x) (x: (elements,)) against the background, one per group
        (default: one per element), within the budget."""
        ...

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        """Evaluations an exact answer over n_features players needs, or None for anytime
        samplers."""
        ...

