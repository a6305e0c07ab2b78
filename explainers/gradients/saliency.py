"""`saliency`: the gradient of the explained target with respect to the input, per element
(Simonyan, Vedaldi & Zisserman 2014): |d target / d x| by default (Captum's Saliency, abs=True),
or signed. Text models: the gradient with respect to each token's embedding, its absolute
values (or signed values) summed over the embedding axis.

One gradient pass at x; no baseline. Group values are sums of the element map. Not additive:
base values are 0 and the values do not add up to the prediction.
"""

from __future__ import annotations

import numpy as np

from explainers.base import Array
from explainers.gradients.backend import GradientModel
from explainers.gradients.common import AtX


class Saliency(AtX):
    """The gradient map at x; one instance per GradientModel (model and target)."""

    name = "saliency"

    def __init__(self, gm: GradientModel, absolute: bool = True) -> None:
        super().__init__(gm)
        self.absolute = absolute

    def _per_variable(self, grad: Array, point: Array) -> Array:
        return np.abs(grad) if self.absolute else grad

    def _diagnostics(self) -> tuple[tuple[str, float], ...]:
        return (("absolute", float(self.absolute)),)
