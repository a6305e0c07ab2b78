"""Dataset-wide and model-internal results as plain arrays, for the plots and the report.

The client's dataset-wide calls (`Client.permutation_importance`, `partial_dependence`,
`dataset_shapley`, `projection`, `live_importance`; service/client/datasets.py) return
subclasses of these carrying the job's summary; the plots draw both. Every array is float64
unless said otherwise; shapes are in the comments."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from service.client.explanation import Explanation
from service.client.wire import Array


@dataclass(frozen=True)
class Importance:
    """One score per feature with its standard error: permutation importance (the drop in a
    metric when the feature is shuffled), or mean |Shapley value| over a data set."""

    feature_names: tuple[str, ...]
    values: Array  # (features,)
    std_errors: Array  # (features,); 0 where unknown
    method: str = "permutation"
    metric: str = ""  # e.g. "accuracy drop", "mean |attribution|"


@dataclass(frozen=True)
class PartialDependence:
    """The model's mean output as one feature moves over a grid (PDP), with the standard error
    of that mean and the per-row curves (ICE) it averages."""

    feature: str
    grid: Array  # (points,)
    average: Array  # (points,)
    std_errors: Array | None = None  # (points,)
    ice: Array | None = None  # (rows, points)
    output: str = ""


@dataclass(frozen=True)
class PartialDependence2D:
    """The mean output over a grid of two features; with a class axis, the decision regions
    (the class with the largest mean output), optionally with data points on top."""

    features: tuple[str, str]
    grid_x: Array  # (nx,)
    grid_y: Array  # (ny,)
    values: Array  # (nx, ny) or (nx, ny, classes)
    class_names: tuple[str, ...] = ()
    points: Array | None = None  # (n, 2) data in the two features
    point_classes: Array | None = None  # (n,) int class of each point
    output: str = ""


@dataclass(frozen=True)
class Activations:
    """One layer's activations for one input: a map per channel."""

    layer: str
    values: Array  # (channels, H, W)


@dataclass(frozen=True)
class Attention:
    """Attention probabilities of one layer for one text: per head, query x key."""

    layer: str
    tokens: tuple[str, ...]
    weights: Array  # (heads, tokens, tokens)


@dataclass(frozen=True)
class Embedding:
    """Points in a model's embedding space (projected to 2-D for plotting), with a class or a
    value per point for colour and optional labels."""

    name: str
    points: Array  # (n, dims)
    classes: tuple[str, ...] = ()  # (n,) category per point
    values: Array | None = None  # (n,) a number per point (e.g. a prediction)
    labels: tuple[str, ...] = ()  # (n,) text shown next to the first points


def shapley_importance(e: Explanation, output: int = 0) -> Importance:
    """Mean |attribution| per feature over the explained rows, with its standard error over
    rows (std / sqrt(rows))."""
    phi = np.abs(e.values[:, output, :])  # (rows, features)
    rows = len(phi)
    se = phi.std(axis=0, ddof=1) / np.sqrt(rows) if rows > 1 else np.zeros(phi.shape[1])
    return Importance(e.feature_names, phi.mean(axis=0), se, method="Shapley",
                      metric=f"mean |attribution| ({e.output_names[output]})")
