"""Masked batches: the model rows that replace absent players by reference values, built
vectorised and evaluated in bounded chunks through the Evaluator.

Masks are over players (groups, explainers/groups.py); each function turns them into element
masks with the groups, so an estimator never needs to know what a player is made of. Rows are
selected bit for bit on the floats' integer view (exact, NaN-safe), with the numpy passes laid
out over long contiguous planes where the model does not care about the rows' order
(docs/benchmarks.md, "Overhead over the onnxruntime floor"). Building the rows inside
onnxruntime instead (a masking subgraph in front of the model) was measured slower per row."""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Evaluator
from explainers.groups import Groups


def coalition_values(ev: Evaluator, masks: Array, x: Array, background: Background,
                     groups: Groups | None = None) -> Array:
    """v(S) = sum_b w_b f(x_S, bg_b) for every coalition, against every background row.

    masks: (coalitions, players) bool, True = the player comes from x. Returns (coalitions,
    outputs). Coalitions are processed in blocks so memory stays bounded for any count.
    """
    rows = background.rows
    block = max(1, ev.chunk_rows // rows)
    bg: Array = background.data.astype(ev.dtype)[None]  # (1, rows, features), cast once
    out = []
    for start in range(0, masks.shape[0], block):
        m = _expand(groups, masks[start:start + block])  # (block, elements)
        X = select(m[:, None, :], x, bg, ev.dtype)  # (block, rows, features)
        y = ev(X.reshape(-1, x.size)).reshape(m.shape[0], rows, -1)  # (block, rows, outputs)
        out.append(np.einsum("cbk,b->ck", y, background.weights))
    return np.concatenate(out)  # (coalitions, outputs)


def hybrid_values(ev: Evaluator, masks: Array, x: Array, z: Array,
                  groups: Groups | None = None) -> Array:
    """f(x_S, z_S) with one reference row per coalition: masks (..., players), z broadcastable
    to the element masks (e.g. (paths, 1, elements)). Returns (coalitions, outputs), coalitions
    flattened.

    The stochastic game: unbiased for v(S) when z is drawn from the background's weights.
    """
    X = select(_expand(groups, masks), x, z, ev.dtype)  # (..., elements)
    return ev(X.reshape(-1, x.size))


def select(mask: Array, x: Array, z: Array, dtype: type) -> Array:
    """np.where(mask, x, z) in dtype, bit for bit (NaN payloads included): z ^ (-mask & (x ^ z))
    on the floats' integer view, two passes over the output where np.where's broadcast loop
    costs 2-4x more."""
    it = _int_of(dtype)
    xi: Array = np.ascontiguousarray(x, dtype).view(it)
    zi: Array = np.ascontiguousarray(z, dtype).view(it)
    on = np.negative(mask, dtype=it)  # -1 where x is taken, 0 elsewhere
    out = np.bitwise_and(on, np.bitwise_xor(xi, zi))  # broadcast to the output's shape
    np.bitwise_xor(out, zi, out=out)
    return np.asarray(out.view(dtype))


def path_rows(x: Array, Z: Array, ranks: Array, dtype: type, players: int | None = None,
              path_major: bool = False) -> Array:
    """The inner coalitions of permutation paths: row (k, p) holds x on the elements ranked
    below k + 1 in path p and Z[p] elsewhere. ranks: (paths, elements), each element carrying
    its player's rank (-1: always from x). Returns (players - 1, paths, elements) in dtype, or
    (paths, players - 1, elements) with `path_major`.

    (rank - k - 1) >> (bits - 1) is all ones exactly where x is taken, and selects on the
    floats' integer view. Step-major, each of the four passes runs over whole (paths, elements)
    planes; path-major, numpy's inner loops are one row of elements long: 2-4x slower, but
    consecutive rows then differ in one player, which tree ensembles run faster.
    """
    d = x.size if players is None else players
    it = _int_of(dtype)
    axis = 1 if path_major else 0  # where the steps go
    xi: Array = x.astype(dtype).view(it)  # (features,)
    zi: Array = np.expand_dims(np.ascontiguousarray(Z, dtype=dtype).view(it), axis)
    steps: Array = np.arange(1, d, dtype=it).reshape((1, -1, 1) if path_major else (-1, 1, 1))
    # C order matters: a strided `ranks` (a column-indexed view) makes numpy lay `out` out the
    # same way and every pass runs strided (digits' live pixels: 107 -> 21 ns per row); a
    # no-op for C-ordered ranks, as Groups.expand_ranks now gives
    ri: Array = np.ascontiguousarray(ranks, dtype=it)  # (paths, elements)
    out = np.subtract(np.expand_dims(ri, axis), steps)
    np.right_shift(out, 8 * np.dtype(it).itemsize - 1, out=out)
    np.bitwise_and(out, np.bitwise_xor(xi, zi), out=out)
    np.bitwise_xor(out, zi, out=out)
    return np.asarray(out.view(dtype))


def path_values(ev: Evaluator, x: Array, Z: Array, ranks: Array,
                groups: Groups | None = None) -> Array:
    """f on the inner coalitions of every path (see path_rows): (paths, players - 1, outputs);
    ranks are the players' ranks (paths, players).

    Built and evaluated one model chunk at a time, so each batch is still in cache when the
    model reads it and no round-sized batch is ever held in memory. The model sees the rows
    step-major unless the evaluator asks for paths one after the other; only its outputs are
    put back in path order.
    """
    d, major = ranks.shape[1], ev.path_major
    step = max(1, ev.chunk_rows // (d - 1))  # paths per model call
    ranks_e = ranks if groups is None else groups.expand_ranks(ranks)  # (paths, elements)
    parts = []
    for i in range(0, ranks.shape[0], step):
        X = path_rows(x, Z[i:i + step], ranks_e[i:i + step], ev.dtype, d, major)
        y = ev(X.reshape(-1, x.size))  # (rows, outputs)
        n = ranks_e[i:i + step].shape[0]
        parts.append(y.reshape(n, d - 1, -1) if major
                     else y.reshape(d - 1, n, -1).transpose(1, 0, 2))  # (n, d - 1, outputs)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def pinned(ev: Evaluator, x: Array, background: Background, groups: Groups | None) -> Background:
    """The background as the game sees it: elements in no group keep x's values in every
    row, so v(empty) = E_b f(x_fixed, bg_b) is the base value. Unchanged (no model call) when
    every element belongs to a group or the rows already hold x's values there (a text
    baseline built from x)."""
    if groups is None or not np.any(groups.index < 0):
        return background
    fixed = groups.index < 0  # (elements,)
    data = np.where(fixed, x, background.data)  # (rows, elements)
    if np.array_equal(data, background.data):
        return background
    return Background.build(data, ev(data.astype(ev.dtype)), background.weights)


def players_of(x: Array, groups: Groups | None) -> int:
    """d: the number of players (each element when there are no groups)."""
    return x.size if groups is None else groups.size


def sample_rows(background: Background, n: int, rng: np.random.Generator) -> Array:
    """Indices of `n` background rows drawn with the background's weights."""
    return rng.choice(background.rows, size=n, p=background.weights)


def _int_of(dtype: type) -> type:
    """The signed integer type as wide as the float dtype: its view selects bits."""
    return {2: np.int16, 4: np.int32}.get(np.dtype(dtype).itemsize, np.int64)


def _expand(groups: Groups | None, masks: Array) -> Array:
    return masks if groups is None else groups.expand(masks)
