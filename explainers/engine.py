"""The coalition-evaluation engine shared by every sampler: counted, chunked model calls that
learn their own throughput, and vectorised construction of masked batches."""

from __future__ import annotations

import time

import numpy as np

from explainers.base import Array, Background, Budget, ModelFn

# Never plan to use more than this share of the remaining time: leaves room for the solve,
# serialisation and the noise in the throughput estimate.
SAFETY = 0.8


class Evaluator:
    """Evaluates any batch in bounded chunks, counts rows and learns rows/second as it goes.

    One per request: the data plane seeds it with the throughput measured when the model loaded,
    so the first round is planned from a real figure rather than a guess.
    """

    def __init__(self, fn: ModelFn, chunk_rows: int = 4096, rows_per_second: float = 1e5,
                 call_overhead_s: float = 5e-5, dtype: type = np.float64) -> None:
        self._fn = fn
        self.dtype = dtype  # masked batches are built in the model's input type: no extra cast
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
        start = time.perf_counter()
        y = self._fn(X)
        elapsed = time.perf_counter() - start
        self.evaluations += X.shape[0]
        if X.shape[0] >= 64 and elapsed > 0:  # tiny calls measure overhead, not throughput
            rate = X.shape[0] / max(elapsed - self.call_overhead_s, 1e-9)
            self.rows_per_second = 0.7 * self.rows_per_second + 0.3 * rate
        return y

    def seconds_for(self, rows: int) -> float:
        """Predicted wall time to evaluate `rows` rows."""
        calls = -(-rows // self.chunk_rows)
        return rows / self.rows_per_second + calls * self.call_overhead_s

    def affordable_rows(self, budget: Budget) -> int:
        """Rows that fit in the budget's remaining time and evaluation cap."""
        remaining = budget.remaining() * SAFETY
        by_time = int(remaining * self.rows_per_second) if np.isfinite(remaining) else 2**62
        cap = 2**62 if budget.max_evaluations is None else budget.max_evaluations - self.evaluations
        return max(0, min(by_time, cap))


def coalition_values(ev: Evaluator, masks: Array, x: Array, background: Background) -> Array:
    """v(S) = sum_b w_b f(x_S, bg_b) for every coalition, against every background row.

    masks: (coalitions, features) bool, True = the feature comes from x. Returns (coalitions,
    outputs). Coalitions are processed in blocks so memory stays bounded for any count.
    """
    rows = background.rows
    block = max(1, ev.chunk_rows // rows)
    out = []
    for start in range(0, masks.shape[0], block):
        m = masks[start:start + block]  # (block, features)
        X = np.where(m[:, None, :], x.astype(ev.dtype),
                     background.data.astype(ev.dtype)[None])  # (block, rows, features)
        y = ev(X.reshape(-1, x.size)).reshape(m.shape[0], rows, -1)  # (block, rows, outputs)
        out.append(np.einsum("cbk,b->ck", y, background.weights))
    return np.concatenate(out)  # (coalitions, outputs)


def hybrid_values(ev: Evaluator, masks: Array, x: Array, z: Array) -> Array:
    """f(x_S, z_S) with one reference row per coalition: masks (..., features), z broadcastable
    to it (e.g. (paths, 1, features)). Returns (coalitions, outputs), coalitions flattened.

    The stochastic game: unbiased for v(S) when z is drawn from the background's weights.
    """
    X = np.where(masks, x.astype(ev.dtype), z.astype(ev.dtype))  # (..., features), one pass
    return ev(X.reshape(-1, x.size))


def path_rows(x: Array, Z: Array, ranks: Array, dtype: type) -> Array:
    """The inner coalitions of permutation paths: row (p, k) holds x on the features ranked
    below k + 1 in path p and Z[p] elsewhere. Returns (paths, features - 1, features) in dtype.

    Bitwise select on the floats' integer view, (rank - k - 1) >> (bits - 1) being all ones
    exactly where x is taken: exact, NaN-safe and about twice as fast as np.where here.
    """
    d = x.size
    it = np.int32 if np.dtype(dtype).itemsize == 4 else np.int64
    xi: Array = x.astype(dtype).view(it)  # (features,)
    zi: Array = np.ascontiguousarray(Z, dtype=dtype).view(it)  # (paths, features)
    out = np.subtract(ranks.astype(it, copy=False)[:, None, :],
                      np.arange(1, d, dtype=it)[None, :, None])  # (paths, d - 1, features)
    np.right_shift(out, 8 * np.dtype(it).itemsize - 1, out=out)
    np.bitwise_and(out, np.bitwise_xor(xi, zi)[:, None, :], out=out)
    np.bitwise_xor(out, zi[:, None, :], out=out)
    return np.asarray(out.view(dtype))


def path_values(ev: Evaluator, x: Array, Z: Array, ranks: Array) -> Array:
    """f on the inner coalitions of every path (see path_rows): (paths, features - 1, outputs).

    Built and evaluated one model chunk at a time, so each batch is still in cache when the
    model reads it and no round-sized batch is ever held in memory.
    """
    d = x.size
    step = max(1, ev.chunk_rows // (d - 1))  # paths per model call
    parts = [ev(path_rows(x, Z[i:i + step], ranks[i:i + step], ev.dtype).reshape(-1, d))
             for i in range(0, ranks.shape[0], step)]
    y = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return y.reshape(ranks.shape[0], d - 1, -1)


def sample_rows(background: Background, n: int, rng: np.random.Generator) -> Array:
    """Indices of `n` background rows drawn with the background's weights."""
    return rng.choice(background.rows, size=n, p=background.weights)
