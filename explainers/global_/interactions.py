"""TreeSHAP interaction values of a tree ensemble read from its ONNX graph, over many rows.

shap computes interaction values for path-dependent TreeSHAP only (its interventional code
prints "FEATURE_DEPENDENCE::independent does not support interactions!" and returns zeros), and
path-dependent TreeSHAP weighs each branch by its node's cover, which an ONNX graph does not
store (skl2onnx writes hit rates of 1.0). The covers are counted here by passing reference rows
through the trees: given the training rows they are the trained model's own covers, and the
values equal shap's on the native model. The values are exact for that game (the trees'
conditional expectations); a row's values add up to its path-dependent SHAP values, which are
not the interventional values of the `tree` method. All on the margin scale (before a
classifier's post_transform), like `tree`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import shap

from explainers.base import SAFETY, Array
from explainers.errors import InvalidArgument
from explainers.global_.jobs import BATCH_CELLS, CHUNK_S, Control, Job, JobInfo, Meter, frozen
from explainers.trees.onnx_trees import ParsedTrees, ShapTree, shap_model

LEAF_PRIOR = 1e-9  # cover every leaf gets, times the total: a node no reference row reaches
# still has a cover (the recursion divides by it); it moves the values by about this share
VALUES_CELLS = 2**23  # per-row values kept at most (64 MB); beyond, only the mean |value|


@dataclass(frozen=True)
class Interactions:
    """Interaction values per row (the diagonal holds main effects; a pair's effect is split
    evenly between (i, j) and (j, i)) and their mean absolute value over the rows."""

    values: Array | None  # (rows, outputs, features, features); None when too large to keep
    mean_abs: Array  # (outputs, features, features)
    rows: int  # rows explained: the first rows of X given
    info: JobInfo


def tree_interactions(parsed: ParsedTrees, X: Array, reference: Array,
                      columns: Sequence[int] | None = None,
                      control: Control | None = None) -> Job[Interactions]:
    """Interaction values of the rows X (rows, features) for the op's score `columns` (all by
    default), with covers counted on the `reference` rows; stops early on the deadline."""
    ctl = control or Control()
    data = _as_input(parsed, X)
    weights = _columns(parsed, columns)  # (columns, targets)
    explainer = _explainer(parsed, _as_input(parsed, reference))
    meter = Meter(data.shape[0], "rows")
    yield meter.progress()
    sums = _Sums(data.shape[0] * weights.shape[0] * data.shape[1] ** 2 <= VALUES_CELLS)
    stopped = yield from _explain(explainer, data, weights, ctl, meter, sums)
    return sums.result(JobInfo(0, meter.elapsed, stopped, sums.notes() + _scale(parsed)))


class _Sums:
    """The values of the rows done (when small enough to keep) and their running |sum|."""

    def __init__(self, keep: bool) -> None:
        self.keep, self.done = keep, 0
        self.parts: list[Array] = []
        self.total: Array = np.zeros(())  # grows to (columns, features, features)

    def add(self, values: Array) -> None:
        """Fold in the values (rows, columns, features, features) of the next rows."""
        self.total = self.total + np.abs(values).sum(axis=0)
        self.parts.extend([values] if self.keep else [])
        self.done += values.shape[0]

    def notes(self) -> tuple[str, ...]:
        return () if self.keep else (f"values: over {VALUES_CELLS} values; only mean_abs kept",)

    def result(self, info: JobInfo) -> Interactions:
        values = frozen(np.concatenate(self.parts)) if self.keep else None
        return Interactions(values, frozen(self.total / self.done), self.done, info)


def _explain(explainer: shap.TreeExplainer, data: Array, weights: Array, control: Control,
             meter: Meter, sums: _Sums) -> Job[str]:
    """Interaction values of the rows in turn, in chunks of about CHUNK_S; returns "deadline"
    when the next chunk would not fit the time left (never before the first row)."""
    cells = (data.shape[1] + 1) ** 2 * max(1, weights.shape[1])  # shap's array per row
    step, most = 1, max(1, BATCH_CELLS // cells)
    while sums.done < data.shape[0]:
        control.check()
        if sums.done and step * meter.elapsed / sums.done > SAFETY * control.budget.remaining():
            return "deadline"
        start = time.perf_counter()
        sums.add(_values(explainer, data[sums.done:sums.done + step], weights))
        seconds = max(time.perf_counter() - start, 1e-9)
        yield from meter.advance(min(step, data.shape[0] - meter.done))
        step = max(1, min(most, int(CHUNK_S * step / seconds)))
    return ""


def node_covers(tree: ShapTree, rows: Array) -> Array:
    """How many of `rows` (rows, features) pass through each node of the tree (nodes,), with
    LEAF_PRIOR of the total added at each leaf and summed up to its ancestors."""
    counts = np.zeros(tree["features"].size)
    node = np.zeros(rows.shape[0], np.int64)  # where each row is
    at = np.arange(rows.shape[0])
    while node.size:
        np.add.at(counts, node, 1.0)
        inner = tree["children_left"][node] >= 0
        node, at = node[inner], at[inner]
        x = rows[at, tree["features"][node]]
        node = np.where(np.isnan(x), tree["children_default"][node],
                        np.where(x <= tree["thresholds"][node], tree["children_left"][node],
                                 tree["children_right"][node]))
    return np.asarray(counts + LEAF_PRIOR * max(rows.shape[0], 1) * _leaves_below(tree))


def _leaves_below(tree: ShapTree) -> Array:
    """Number of leaves under each node (nodes,); nodes are in preorder (children after their
    parent), so one reverse sweep adds each node's children."""
    left, right = tree["children_left"], tree["children_right"]
    below = (left < 0).astype(np.float64)
    for n in np.flatnonzero(left >= 0)[::-1]:
        below[n] = below[left[n]] + below[right[n]]
    return below


def _scale(parsed: ParsedTrees) -> tuple[str, ...]:
    """What the caller must be told about the scale of the values."""
    link = parsed["post_transform"]
    return () if link == "NONE" else (f"margin scale: the values are before the model's {link}",)


def _explainer(parsed: ParsedTrees, reference: Array) -> shap.TreeExplainer:
    """shap's path-dependent explainer on the trees, their covers counted on `reference`."""
    if reference.shape[0] < 1:
        raise InvalidArgument("reference: at least one row to count the trees' covers on")
    model = shap_model(parsed)
    for tree in model["trees"]:
        tree["node_sample_weight"] = node_covers(tree, reference)
    return shap.TreeExplainer(model, feature_perturbation="tree_path_dependent")


def _values(explainer: shap.TreeExplainer, rows: Array, weights: Array) -> Array:
    """Interaction values (rows, columns, features, features) of the op's score columns."""
    raw = np.asarray(explainer.shap_interaction_values(rows), np.float64)
    per_target = raw.reshape(*raw.shape[:3], -1)  # (rows, f, f, targets): shap drops one target
    return np.asarray(np.einsum("kt,rijt->rkij", weights, per_target))


def _as_input(parsed: ParsedTrees, X: Array) -> Array:
    """Rows as the op compares them (its input precision), checked against its features."""
    data = np.asarray(X, np.float64)
    if data.ndim != 2 or data.shape[1] != parsed["n_features"]:
        raise InvalidArgument(f"x: rows of {parsed['n_features']} features needed, got shape "
                              f"{data.shape}")
    return data.astype(parsed["input_dtype"]).astype(np.float64)


def _columns(parsed: ParsedTrees, columns: Sequence[int] | None) -> Array:
    """The map from tree targets to the chosen score columns (columns, targets)."""
    outputs = parsed["output_map"].shape[0]
    cols = list(range(outputs)) if columns is None else [int(c) for c in columns]
    if not cols or min(cols) < 0 or max(cols) >= outputs:
        raise InvalidArgument(f"output_columns: {cols} outside the model's {outputs} columns")
    return np.asarray(parsed["output_map"][cols], np.float64)
