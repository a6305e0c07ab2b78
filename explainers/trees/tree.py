"""`tree`: exact interventional TreeSHAP for ONNX tree ensembles, with no model evaluations.

The ensemble is read from the graph once (explainers.trees.onnx_trees). Attributions come from
what one pass over a background leaves per leaf (explainers.trees.leaf_tables): lookup tables
for leaves with few path features, the background's distinct patterns for deeper ones
(explainers.trees.leaf_patterns). Both are exact, and a row's cost does not follow the number of
background rows: 20-80x less per row than shap's C walk over every background row. Leaves with
more than 52 path features, or backgrounds with over a million distinct patterns, use shap's
interventional TreeSHAP instead; each result's notes say which engine ran. Everything is on the
margin scale: the raw tree sums before the op's post_transform (for a LOGISTIC classifier, the
log-odds), so the values add up exactly to the margin, and the result's notes say which
transform the model applies after it.

The one-off fit of a background (its pass and the tables) is predicted before it runs, from the
rates this object measured on its earlier fits (built-in rates before the first), so that the
caller can count it in a budget or do it ahead of traffic (`prefit`).

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
from explainers.trees.leaf_patterns import TooManyPatterns
from explainers.trees.leaf_tables import LeafBoxes, LeafTables, TablesTooLarge
from explainers.trees.onnx_trees import ParsedTrees, parse_onnx_trees, shap_model

MAX_WEIGHT_GROUPS = 64  # distinct background weights on shap's path: one pass per request
CACHE_SIZE = 4  # backgrounds whose tables or shap explainers a TreeShap keeps on its own
CACHE_BYTES = 64 * 1024**2  # ... and their bytes (a shared FitCache sets its own bound)
# Until a fit is measured: seconds per (background row x slot) of the pass over a background, and
# per table entry built (the patterns are collected in the pass). What a busy 2-core x86 machine
# takes, rounded up: 1-2e-8 and 2-4e-8 for large ensembles (docs/benchmarks.md, deep trees).
PASS_PRIOR_S = 2e-8
BUILD_PRIOR_S = 4e-8


@dataclass(frozen=True)
class _Fitted:
    """What one background needs: its leaf tables, or shap explainers as (share of the total
    weight, explainer) per weight group.

    Holds the background itself, so its id cannot be reused while the entry is cached.
    """

    background: Background
    tables: LeafTables | None
    parts: tuple[tuple[float, Any], ...]
    engine: str  # what explains rows against this background, for the notes
    units: int  # work per explained row: slots + pattern entries, or background rows on shap

    def nbytes(self) -> int:
        """What this entry holds: the tables (not the trees' boxes, which the TreeShap owns),
        the shap explainers and the background it pins."""
        tables = () if self.tables is None else (self.tables.tables, self.tables.patterns,
                                                 self.tables.weights, self.tables.expected)
        return nbytes_of(self.background, self.parts, *tables)


FitCache = ByteLru[tuple[object, bytes], _Fitted]  # (TreeShap, background digest) -> fitted


def fit_cache(max_bytes: int, max_items: int | None = None) -> FitCache:
    """A cache of fitted backgrounds bounded by what they hold themselves (the boxes of the
    trees belong to their TreeShap, which its owner counts)."""
    return ByteLru(max_bytes, max_items, _Fitted.nbytes)


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
        self._cache = fits if fits is not None else fit_cache(CACHE_BYTES, max(1, cache_size))
        self._owner = object()
        self._boxes, self.engine = (_boxes(parsed, self._targets) if tables
                                    else (None, "shap's interventional TreeSHAP (asked for)"))
        # measured speeds: seconds per (row x unit of work) by engine (tables or not); a fit's
        # pass per (background row x slot) and its build; the share of the possible patterns
        # the last background had
        self._per_unit: dict[bool, float] = {}
        self._fit_rates: tuple[float, float] | None = None
        self._pattern_share = 1.0

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
        """Explain every row of X (rows, features) in one vectorised pass; the model is never
        evaluated (`model` is accepted for the common batch signature)."""
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
        if self._boxes is None:
            _check_weight_groups(background.weights)

    def seconds_for(self, rows: int, background: Background) -> float | None:
        """Predicted time to explain `rows` rows against `background`, with its one-off fit
        when it has none yet; None while neither is known (shap's walk before its first call)."""
        fitted = self._lookup(background)
        if fitted is not None:
            per_unit = self._per_unit.get(fitted.tables is not None)
            return None if per_unit is None else per_unit * rows * fitted.units
        fit, per_unit = self._predicted_fit(background), self._per_unit.get(self._boxes is not None)
        if per_unit is None and not fit:
            return None
        return fit + (per_unit or 0.0) * rows * self._units(background)

    def fit_seconds(self, background: Background) -> float:
        """Predicted one-off time to fit `background`: 0 once fitted."""
        return 0.0 if self._lookup(background) is not None else self._predicted_fit(background)

    def _predicted_fit(self, background: Background) -> float:
        """A pass over the background's rows and the slots, then building the tables and
        patterns (0 on shap's walk, whose explainers are built in no time)."""
        if self._boxes is None:
            return 0.0
        pass_s, build_s = self._fit_rates or (PASS_PRIOR_S,
                                              BUILD_PRIOR_S * self._boxes.table_entries)
        return pass_s * background.rows * self._boxes.slots + build_s

    def prefit(self, background: Background) -> None:
        """Fit `background` now (ahead of traffic) unless it is fitted already."""
        self._fitted(background)

    def _units(self, background: Background) -> int:
        """Work per explained row against a background not fitted yet: slots plus its expected
        pattern entries, or its rows on shap's walk."""
        if self._boxes is None:
            return background.rows
        expected = self._pattern_share * self._boxes.pattern_bound(background.rows)
        return self._boxes.slots + int(expected)

    def _explain(self, X: Array, background: Background, evaluations: int) -> list[Explanation]:
        """Explain X (rows, features) against the background's fit, timing it."""
        fitted = self._fitted(background)
        start = time.perf_counter()
        phi, base, raw = (self._shap(X, fitted) if fitted.tables is None
                          else self._tables(X, fitted))
        self._learn(fitted.tables is not None,
                    (time.perf_counter() - start) / (X.shape[0] * max(fitted.units, 1)))
        values = np.einsum("kt,rft->rkf", self._map, phi)  # (rows, columns, features)
        base_out = self._map @ base + self._offset  # (columns,)
        pred = raw @ self._map.T + self._offset  # (rows, columns)
        notes = (*self.notes, f"tree engine: exact interventional TreeSHAP by {fitted.engine}")
        return [Explanation.build(self.name, v, np.zeros_like(v), base_out, p,
                                  evaluations=evaluations, converged=True,
                                  budget_exhausted=False, notes=notes)
                for v, p in zip(values, pred, strict=True)]

    def _learn(self, tables: bool, per_unit: float) -> None:
        """Fold one measurement into the running estimate (the first one sets it)."""
        self._per_unit[tables] = _blend(self._per_unit.get(tables), per_unit)

    def _learn_fit(self, background: Background, pass_s: float, build_s: float,
                   tables: LeafTables) -> None:
        """Fold one fit's measured pass and build into the estimates (the first sets them)."""
        assert self._boxes is not None
        new = (pass_s / max(background.rows * self._boxes.slots, 1), build_s)
        old = self._fit_rates or (None, None)
        self._fit_rates = (_blend(old[0], new[0]), _blend(old[1], new[1]))
        bound = self._boxes.pattern_bound(background.rows)
        self._pattern_share = tables.entries / bound if bound else 1.0

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

    def _lookup(self, background: Background) -> _Fitted | None:
        """The fitted entry of this background (same object or same bytes), if cached."""
        for key, entry in reversed(self._cache.items()):
            if key[0] is self._owner and entry.background is background:
                self._cache.get(key)  # now the most recent
                return entry
        return self._cache.get((self._owner, _digest(background)))

    def _fitted(self, background: Background) -> _Fitted:
        """The cached fit of this background, or a new one."""
        found = self._lookup(background)
        if found is not None:
            return found
        key = (self._owner, _digest(background))
        return self._cache.get_or_build(key, lambda: self._fit(background))

    def _fit(self, background: Background) -> _Fitted:
        """Leaf tables and patterns for the background (timed, to predict the next fits), or
        shap's explainers when the trees or this background have none."""
        data = background.data.astype(self._parsed["input_dtype"]).astype(np.float64)
        if self._boxes is None:
            return self._fit_shap_engine(background, data, self.engine)
        start = time.perf_counter()
        try:
            counts = LeafTables.count(self._boxes, data, background.weights)
            middle = time.perf_counter()
            tables = LeafTables.build(self._boxes, counts)
        except TooManyPatterns as exc:
            return self._fit_shap_engine(background, data,
                                         f"shap's interventional TreeSHAP ({exc})")
        self._learn_fit(background, middle - start, time.perf_counter() - middle, tables)
        return _Fitted(background, tables, (), self._boxes.engine(),
                       self._boxes.slots + tables.entries)

    def _fit_shap_engine(self, background: Background, data: Array, engine: str) -> _Fitted:
        """shap's explainers for the background; its weights must fit MAX_WEIGHT_GROUPS."""
        _check_weight_groups(background.weights)
        return _Fitted(background, None, self._fit_shap(data, background.weights), engine,
                       background.rows)

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
    """The leaf boxes, or None and why shap's walk is used instead; and the engine's name."""
    try:
        boxes = LeafBoxes.build(parsed, targets)
    except TablesTooLarge as exc:
        return None, f"shap's interventional TreeSHAP ({exc})"
    return boxes, boxes.engine()


def _check_weight_groups(w: Array) -> None:
    """shap's walk runs once per distinct weight: at most MAX_WEIGHT_GROUPS of them."""
    groups = 1 if w.min() == w.max() else np.unique(w[w > 0]).size
    if groups > MAX_WEIGHT_GROUPS:
        raise InvalidArgument(f"background.weights: {groups} distinct weights; tree explains "
                              f"weighted backgrounds with at most {MAX_WEIGHT_GROUPS} on shap's "
                              "walk: use uniform weights or the permutation method")


def _blend(old: float | None, new: float) -> float:
    """A running estimate: the first measurement sets it, later ones move it by 30%."""
    return new if old is None else 0.7 * old + 0.3 * new


def _digest(background: Background) -> bytes:
    """Content key of a background: data, weights and shape."""
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(background.data.shape).encode())
    h.update(np.ascontiguousarray(background.data).tobytes())
    h.update(np.ascontiguousarray(background.weights).tobytes())
    return h.digest()
