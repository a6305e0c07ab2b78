"""Dummy players. A player whose elements equal x's in every background row changes no
coalition's value (the masked rows are identical bit for bit), so its Shapley value is exactly
0: the samplers play the game without it (paths one step shorter per dummy: about 15% of a
digit image's pixels against a digits background) and report 0 with a zero-width interval,
the only attributions a sampler reports as exact. Against a single background row the same
holds row by row, which the permutation sampler uses for its error bars (permutation.py).
"""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Explanation
from explainers.groups import NO_GROUP, Groups


def differences(x: Array, background: Background, groups: Groups | None, dtype: type) -> Array:
    """(rows, players) bool: whether background row b differs from x on player j, compared in
    the model's input type bit for bit, as the masked rows are built (masking.path_rows)."""
    it = np.int32 if np.dtype(dtype).itemsize == 4 else np.int64
    xi = x.astype(dtype).view(it)  # (elements,)
    zi = np.ascontiguousarray(background.data, dtype=dtype).view(it)  # (rows, elements)
    diff = zi != xi[None]  # (rows, elements)
    if groups is None or groups.identity:
        return np.asarray(diff)
    member = groups.index[:, None] == np.arange(groups.size)[None]  # (elements, players)
    return np.asarray((diff.astype(np.int64) @ member) > 0)


def live_game(groups: Groups | None, live: Array, elements: int) -> Groups | None:
    """The players that can contribute (live: (players,) bool), as groups whose dummy players'
    elements are pinned to x (-1); None when every player is live, or when a hierarchy ties the
    players together (Owen values: the tree would lose its leaves)."""
    if bool(live.all()) or (groups is not None and groups.hierarchy is not None):
        return None
    index = np.arange(elements) if groups is None else groups.index  # (elements,) player ids
    labels = tuple(str(j) for j in range(live.size)) if groups is None else groups.labels
    renumber = np.where(live, np.cumsum(live) - 1, NO_GROUP)  # (players,) new id or -1
    mapped = np.where(index >= 0, renumber[np.maximum(index, 0)], NO_GROUP)
    return Groups.build(mapped, [labels[j] for j in np.flatnonzero(live)])


def with_dummies(e: Explanation, live: Array) -> Explanation:
    """The explanation of the live game with the dummy players put back: 0, standard error 0."""
    def spread(a: Array, fill: float) -> Array:
        out = np.full((a.shape[0], live.size), fill)  # (outputs, players)
        out[:, live] = a
        return out

    dofs = None if e.dofs is None else spread(e.dofs, np.inf)
    return Explanation.build(e.method, spread(e.values, 0.0), spread(e.std_errors, 0.0),
                             e.base_values, e.prediction, dofs=dofs, **_meta(e))


def all_dummies(method: str, fx: Array, background: Background, players: int,
                evaluations: int) -> Explanation:
    """Every player a dummy: x equals every background row, so f(x) = E f and all values are
    0 exactly."""
    zeros = np.zeros((fx.size, players))  # (outputs, players)
    return Explanation.build(method, zeros, zeros, background.base_values, fx,
                             evaluations=evaluations, converged=True, budget_exhausted=False)


def _meta(e: Explanation) -> dict[str, object]:
    """The explanation's fields other than its arrays, for Explanation.build."""
    keep = ("evaluations", "converged", "budget_exhausted", "samples", "dof", "notes",
            "additive", "diagnostics")
    return {k: getattr(e, k) for k in keep}
