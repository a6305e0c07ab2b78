"""Projection of rows (the inputs, or a layer's activations) to two or three dimensions for a
scatter plot coloured by the model's prediction: PCA by numpy's SVD of the centred rows.

The signs follow scikit-learn's PCA (`svd_flip(u_based_decision=False)`): in each component
the loading of largest magnitude is positive, so the same rows always give the same picture.
t-SNE and UMAP are not offered: the server has no package that does them well (scikit-learn,
openTSNE and umap-learn are not runtime dependencies), and a hand-written t-SNE could not be
checked against a reference to any tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument
from explainers.global_.jobs import frozen


@dataclass(frozen=True)
class Projection:
    """Rows in the plane (or space) of the leading principal components."""

    method: str  # "pca"
    coordinates: Array  # (rows, components)
    explained_variance_ratio: Array  # (components,) share of the total variance
    components: Array  # (components, dims) unit loadings
    mean: Array  # (dims,) what was subtracted first
    colour: Array | None  # (rows, ...) passed through: predictions, labels, a chosen column


def pca(rows: Array, components: int = 2, colour: Array | None = None) -> Projection:
    """The leading `components` principal components of rows (rows, dims)."""
    data = _checked(rows, components, colour)
    mean = data.mean(axis=0)  # (dims,)
    U, S, Vt = np.linalg.svd(data - mean, full_matrices=False)  # U (rows, k), Vt (k, dims)
    signs = np.sign(Vt[np.arange(Vt.shape[0]), np.argmax(np.abs(Vt), axis=1)])  # (k,)
    signs[signs == 0] = 1.0
    U, Vt = U * signs, Vt * signs[:, None]
    variance = S**2
    total = variance.sum()
    ratio = variance / total if total > 0 else np.zeros_like(variance)
    coords = U[:, :components] * S[:components]  # (rows, components)
    return Projection("pca", frozen(coords), frozen(ratio[:components]),
                      frozen(Vt[:components]), frozen(mean),
                      None if colour is None else frozen(np.asarray(colour)))


def _checked(rows: Array, components: int, colour: Array | None) -> Array:
    """Finite rows (rows, dims), at least two, and a number of components they allow."""
    data = np.asarray(rows, np.float64)
    if data.ndim != 2 or data.shape[0] < 2 or not np.all(np.isfinite(data)):
        raise InvalidArgument(f"x: at least two rows of finite values (rows, dims), got shape "
                              f"{data.shape}")
    if components not in (2, 3) or components > min(data.shape):
        raise InvalidArgument(f"components: 2 or 3, and at most min(rows, dims) = "
                              f"{min(data.shape)}")
    if colour is not None and np.shape(colour)[:1] != (data.shape[0],):
        raise InvalidArgument("colour: one value (or vector) per row")
    return data
