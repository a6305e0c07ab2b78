"""`tree`: exact interventional TreeSHAP for ONNX tree ensembles, with no model evaluations.

The ensemble is read from the graph once (explainers.trees.onnx_trees). Attributions come from
per-leaf lookup tables built once per background (explainers.trees.leaf_tables): exact, and 15-30x
faster per row than shap's C walk over every background row. Ensembles whose leaves have too
many path features for tables use shap's interventional TreeSHAP instead. Everything is on the
margin scale: the raw tree sums before the op's post_transform (for a LOGISTIC classifier, the
log-odds), so the values add up exactly to the margin, and the result's notes say which
transform the model applies after it.

Weighted backgrounds are handled exactly: interventional Shapley values are linear in the
background distribution. The tables weigh each background row directly; on shap's path rows are
grouped by weight, shap (which only knows uniform backgrounds) runs once per group, and the
groups are combined with their total weights.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import shap

from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument
from explainers.groups import Groups, ungrouped
from explainers.memory import ByteLru, nbytes_of
from explainers.trees.leaf_tables import LeafBoxes, LeafTables, TablesTooLarge
from explainers.trees.onnx_trees import ParsedTrees, parse_onnx_trees, shap_model

MAX_WEIGHT_GROUPS = 64  # distinct background weights on shap's path: one pass per request
CACHE_SIZE = 4  # backgrounds whose tables or shap explainers a TreeShap keeps on its own
CACHE_BYTES = 64 * 1024**2  # ... and their bytes (a shared FitCache sets its own bound)


@dataclass(frozen=True)
class _Fitted:
    """What one background needs: its leaf tables, or shap explainers as (share of the total
    weight, explainer) per weight group.

    Holds the background itself, so its id cannot be reused while the entry is cached.
    """

    background: Background
    tables: LeafTables | None
    parts: tuple[tuple[float, Any], ...]

    def nbytes(self) -> int:
        """What this entry holds: the tables (not the trees' boxes, which the TreeShap owns),
        the shap explainers and the background it pins."""
        tables = () if self.tables is None else (self.tables.tables, self.tables.weights,
                                                 self.tables.expected)
        return nbytes_of(self.background, self.parts, *tables)


FitCache = ByteLru[tuple[object, bytes], _Fitted]  # (TreeShap, background digest) -> fitted


class TreeShap:
    """Exact TreeSHAP on the trees of one ONNX model; explains the selected score columns."""

    name = "tree"

    def __init__(self, parsed: ParsedTrees, output_columns: Sequence[int] | None = None,
                 cache_size: int = CACHE_SIZE, tables: bool = True,
                 fits: FitCache | None = None) -> None:
        outputs = parsed["output_map"].shape[0]
        cols = list(range(outputs)) if output_columns is None else [int(c) for c in output_columns]
        if not cols or min(cols) < 0 or max(cols) >= outputs:
            raise InvalidArgument(f"output_columns: {cols} outside the model's {outputs} columns")
        picked = parsed["output_map"][cols]  # (columns, targets)
        self._targets = [t for t in range(picked.shape[1]) if np.any(picked[:, t])] or [0]
        self._map = picked[:, self._targets]  # (columns, used targets)
        self._offset = parsed["output_offset"][cols]  # (columns,)
        self._parsed = parsed
        self.columns = tuple(cols)
        self.n_features = parsed["n_features"]
        self.post_transform = parsed["post_transform"]
        # fitted backgrounds, keyed by this object (`_owner`) and the background's digest; one
        # cache may serve many TreeShaps, so that one byte bound covers them all
        self._cache = fits if fits is not None else ByteLru(CACHE_BYTES, max(1, cache_size),
                                                           _Fitted.nbytes)
        self._owner = object()
        self._boxes, self.engine = (_boxes(parsed, self._targets) if tables
                                    else (None, "shap's interventional TreeSHAP (asked for)"))
        self._seconds_per_cell: float | None = None  # measured time per row (x bg row on shap)

    @classmethod
    def from_onnx(cls, model: onnx.ModelProto,
                  output_columns: Sequence[int] | None = None) -> TreeShap:
        """Parse the model's tree ensemble; raises onnx_trees.UnsupportedTrees if it cannot."""
        return cls(parse_onnx_trees(model), output_columns)

    @property
    def notes(self) -> tuple[str, ...]:
        """What the caller must say about the scale of the values."""
        if self.post_transform == "NONE":
            return ()
        return (f"margin scale: the model outputs {self.post_transform}(base_values + "
                "sum(values)); values are exact on the margin, before that transform",)

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        """0: the trees are read, the model is never evaluated."""
        return 0

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check x and the background; exact, so the budget and rng are not consulted."""
        ungrouped(self.name, groups)
        row = np.asarray(x, np.float64)
        if row.ndim != 1:
            raise InvalidArgument(f"x: one row of {self.n_features} features, got shape "
                                  f"{row.shape}")
        self._check(row[None], background)
        return self._explain(row[None], background, model.evaluations)[0]

    def explain_rows(self, X: Array, background: Background,
                     model: Evaluator | None = None) -> list[Explanation]:
        """Explain every row of X (rows, features) in one vectorised shap call per group; the
        model is never evaluated (`model` is accepted for the common batch signature)."""
        rows = np.asarray(X, np.float64)
        self._check(rows, background)
        return self._explain(rows, background, 0)

    def _check(self, X: Array, background: Background) -> None:
        """Feature counts must match the model; the weights must fit MAX_WEIGHT_GROUPS."""
        if X.ndim != 2 or X.shape[1] != self.n_features:
            raise InvalidArgument(f"x: rows of {self.n_features} features, got shape {X.shape}")
        if background.data.shape[1] != self.n_features:
            raise InvalidArgument(f"background: {background.data.shape[1]} features, the model "
                                  f"has {self.n_features}")
        w = background.weights
        groups = 1 if w.min() == w.max() else np.unique(w[w > 0]).size
        if groups > MAX_WEIGHT_GROUPS and self._boxes is None:
            raise InvalidArgument(f"background.weights: {groups} distinct weights; tree explains "
                                  f"weighted backgrounds with at most {MAX_WEIGHT_GROUPS}: use "
                                  "uniform weights or the permutation method")

    def seconds_for(self, rows: int, background: Background) -> float | None:
        """Predicted time to explain `rows` rows against `background`; None until measured."""
        per_cell = self._seconds_per_cell
        return None if per_cell is None else per_cell * self._cells(rows, background)

    def _cells(self, rows: int, background: Background) -> int:
        """Units of work: rows with tables (independent of the background), else row pairs."""
        return rows if self._boxes is not None else rows * background.rows

    def _explain(self, X: Array, background: Background, evaluations: int) -> list[Explanation]:
        fitted = self._fitted(background)
        start = time.perf_counter()
        phi, base, raw = (self._shap(X, fitted) if fitted.tables is None
                          else self._tables(X, fitted))
        self._learn((time.perf_counter() - start) / self._cells(X.shape[0], background))
        values = np.einsum("kt,rft->rkf", self._map, phi)  # (rows, columns, features)
        base_out = self._map @ base + self._offset  # (columns,)
        pred = raw @ self._map.T + self._offset  # (rows, columns)
        return [Explanation.build(self.name, v, np.zeros_like(v), base_out, p,
                                  evaluations=evaluations, converged=True,
                                  budget_exhausted=False, notes=self.notes)
                for v, p in zip(values, pred, strict=True)]

    def _learn(self, per_cell: float) -> None:
        """Fold one measurement into the running estimate (the first one sets it)."""
        old = self._seconds_per_cell
        self._seconds_per_cell = per_cell if old is None else 0.7 * old + 0.3 * per_cell

    def _tables(self, X: Array, fitted: _Fitted) -> tuple[Array, Array, Array]:
        """Attributions (rows, features, targets), E[margin] (targets,) and margins (rows,
        targets) from the leaf tables; X is compared in the op's precision."""
        assert fitted.tables is not None
        Xc = X.astype(self._parsed["input_dtype"]).astype(np.float64)  # (rows, features)
        phi, raw = fitted.tables.explain(Xc)
        return phi, fitted.tables.expected, raw

    def _shap(self, X: Array, fitted: _Fitted) -> tuple[Array, Array, Array]:
        """Weighted attributions (rows, features, targets), E[margin] (targets,) and the margin
        of each row (rows, targets), all on the used targets."""
        phi = np.zeros((X.shape[0], X.shape[1], len(self._targets)))
        base = np.zeros(len(self._targets))
        for share, explainer in fitted.parts:
            sv = np.asarray(explainer.shap_values(X, check_additivity=False))
            phi += share * sv.reshape(phi.shape)  # shap drops the last axis for one target
            base += share * np.atleast_1d(np.asarray(explainer.expected_value, np.float64))
        raw = np.asarray(fitted.parts[0][1].model.predict(X), np.float64).reshape(X.shape[0], -1)
        return phi, base, raw

    @property
    def nbytes(self) -> int:
        """What this object holds besides its fitted backgrounds (in the fit cache): the leaf
        boxes and the output maps (the parsed trees belong to the model)."""
        return nbytes_of(self._boxes, self._map, self._offset, self._targets)

    def _fitted(self, background: Background) -> _Fitted:
        """The cached explainers for this background (same object or same bytes), or new ones."""
        for key, entry in reversed(self._cache.items()):
            if key[0] is self._owner and entry.background is background:
                self._cache.get(key)  # now the most recent
                return entry
        key = (self._owner, _digest(background))
        return self._cache.get_or_build(key, lambda: self._fit(background))

    def _fit(self, background: Background) -> _Fitted:
        """Leaf tables for the background, or shap's explainers when the trees have no tables."""
        data = background.data.astype(self._parsed["input_dtype"]).astype(np.float64)
        if self._boxes is not None:
            return _Fitted(background, LeafTables.fit(self._boxes, data, background.weights), ())
        return _Fitted(background, None, self._fit_shap(data, background.weights))

    def _fit_shap(self, data: Array, weights: Array) -> tuple[tuple[float, Any], ...]:
        """One shap explainer per distinct positive weight, with that group's total weight."""
        parts: list[tuple[float, Any]] = []
        for w in np.unique(weights[weights > 0]):
            rows = np.ascontiguousarray(data[weights == w])  # (group rows, features)
            parts.append((float(w) * rows.shape[0], self._explainer(rows)))
        return tuple(parts)

    def _explainer(self, rows: Array) -> Any:
        """shap's TreeExplainer on every one of `rows` (the masker would otherwise keep 100)."""
        masker = shap.maskers.Independent(rows, max_samples=rows.shape[0])
        return shap.TreeExplainer(shap_model(self._parsed, self._targets), data=masker,
                                  feature_perturbation="interventional")


def _boxes(parsed: ParsedTrees, targets: list[int]) -> tuple[LeafBoxes | None, str]:
    """The leaf boxes for tables, or None and why shap's walk is used instead."""
    try:
        return LeafBoxes.build(parsed, targets), "leaf tables"
    except TablesTooLarge as exc:
        return None, f"shap's interventional TreeSHAP ({exc})"


def _digest(background: Background) -> bytes:
    """Content key of a background: data, weights and shape."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(background.data.shape).encode())
    h.update(np.ascontiguousarray(background.data).tobytes())
    h.update(np.ascontiguousarray(background.weights).tobytes())
    return h.digest()
