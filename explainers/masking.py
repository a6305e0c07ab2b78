"""Masked batches: the model rows that replace absent players by reference values, built
vectorised and evaluated in bounded chunks through the Evaluator."""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Evaluator


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
