"""`input_x_gradient`: each element's value times the gradient of the target with respect to
it (Shrikumar et al. 2016; Captum's InputXGradient). Text models: each token's embedding times
its gradient, summed over the embedding axis.

One gradient pass at x; no baseline (it is integrated gradients' one-step estimate against
zero, exact for a linear model without intercept). Not additive.
"""

from __future__ import annotations

import numpy as np

from explainers.base import Array
from explainers.gradients.common import AtX


class InputXGradient(AtX):
    """x * d target / d x at x; one instance per GradientModel (model and target)."""

    name = "input_x_gradient"

    def _per_variable(self, grad: Array, point: Array) -> Array:
        return np.asarray(grad * point)  # (outputs, p)
