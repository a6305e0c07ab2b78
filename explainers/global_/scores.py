"""The scores permutation importance compares, all "greater is better" like scikit-learn's
scorers: accuracy, log-loss and MSE negated (its neg_log_loss, neg_mean_squared_error), R^2;
without labels, minus the mean absolute change of the outputs from the unpermuted predictions.

A score sees the model's outputs (rows, outputs): class probabilities for accuracy and log-loss
(one column = P(class 1) of a binary classifier), the predicted values for R^2 and MSE.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument

Score = Callable[[Array], float]  # outputs (rows, outputs) -> score, greater is better

# accepted names -> the metric reported; scikit-learn's scorer names are accepted as aliases
METRICS = {"accuracy": "accuracy", "log_loss": "log_loss", "neg_log_loss": "log_loss",
           "r2": "r2", "mse": "mse", "neg_mean_squared_error": "mse",
           "mean_abs_change": "mean_abs_change"}
CLASSIFICATION = ("accuracy", "log_loss")


def metric_name(metric: str, labelled: bool) -> str:
    """The metric to use: the one named, or mean_abs_change when no labels were sent."""
    key = metric.strip().lower() or ("" if labelled else "mean_abs_change")
    if key not in METRICS:
        known = ", ".join(sorted(set(METRICS.values()) - {"mean_abs_change"}))
        raise InvalidArgument(f"metric: {metric!r} is not one of {known} (with labels), or "
                              "mean_abs_change (without)")
    name = METRICS[key]
    if labelled == (name == "mean_abs_change"):
        raise InvalidArgument(f"metric: {name} " + ("needs no labels" if labelled
                                                    else "needs labels"))
    return name


def build_score(name: str, y: Array | None, reference: Array) -> Score:
    """The score `name` against labels y, checked against the model's outputs on the
    unpermuted rows (`reference`, (rows, outputs))."""
    if name == "mean_abs_change":
        return lambda pred: -float(np.mean(np.abs(pred - reference)))
    assert y is not None
    if name in CLASSIFICATION:
        classes = _class_labels(y, reference.shape)
        return _accuracy(classes) if name == "accuracy" else _log_loss(classes)
    target = _targets(y, reference.shape)
    return _r2(target) if name == "r2" else _neg_mse(target)


def _class_labels(y: Array, shape: tuple[int, ...]) -> Array:
    """Labels as class indices 0..k-1, where k is the output columns (2 for one column)."""
    classes = max(2, shape[1])
    labels = np.asarray(y)
    if labels.shape != (shape[0],) or not np.all(np.isin(labels, np.arange(classes))):
        raise InvalidArgument(f"labels: one class index in 0..{classes - 1} per row "
                              f"({shape[0]} rows) for a model with {shape[1]} output columns")
    return labels.astype(np.int64)


def _targets(y: Array, shape: tuple[int, ...]) -> Array:
    """Labels as (rows, outputs) floats: one value per row and output column."""
    target = np.asarray(y, np.float64)
    target = target[:, None] if target.ndim == 1 else target
    if target.shape != shape or not np.all(np.isfinite(target)):
        raise InvalidArgument(f"labels: finite targets of shape {shape} (rows, outputs) needed, "
                              f"got {np.shape(y)}")
    return target


def _probabilities(pred: Array) -> Array:
    """Class probabilities (rows, classes): one column is P(class 1) of a binary classifier."""
    return np.concatenate([1 - pred, pred], axis=1) if pred.shape[1] == 1 else pred


def _accuracy(y: Array) -> Score:
    """Share of rows whose most probable class is the label (ties to the lower class)."""
    return lambda pred: float(np.mean(np.argmax(_probabilities(pred), axis=1) == y))


def _log_loss(y: Array) -> Score:
    """Minus the mean log-loss, the probabilities clipped to [eps, 1 - eps] as scikit-learn
    clips them (so a confident wrong answer costs -log(eps), not infinity)."""
    eps = np.finfo(np.float64).eps
    rows = np.arange(y.size)

    def score(pred: Array) -> float:
        p = np.clip(_probabilities(pred), eps, 1 - eps)[rows, y]  # (rows,)
        return float(np.mean(np.log(p)))
    return score


def _r2(y: Array) -> Score:
    """R^2 per output averaged over outputs; a constant target scores 1 when predicted exactly
    and 0 otherwise (scikit-learn's force_finite)."""
    total = np.sum((y - y.mean(axis=0)) ** 2, axis=0)  # (outputs,)

    def score(pred: Array) -> float:
        residual = np.sum((y - pred) ** 2, axis=0)  # (outputs,)
        safe = np.where(total > 0, total, 1.0)
        r2 = np.where(total > 0, 1 - residual / safe, np.where(residual == 0, 1.0, 0.0))
        return float(np.mean(r2))
    return score


def _neg_mse(y: Array) -> Score:
    return lambda pred: -float(np.mean((y - pred) ** 2))
