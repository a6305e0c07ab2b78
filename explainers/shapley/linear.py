"""Closed-form attributions for affine models: phi_i = w_i (x_i - E[x_i]).

Whether a model is affine is checked on the function itself, not read off its graph: any ONNX
graph whose explained output is affine in the request's features (LinearRegressor, a
LinearClassifier on the logit scale, Gemm or MatMul+Add, behind a Scaler or an Imputer) passes,
and attributions land on the request's features rather than on internal columns. The check is
strict: the affine fit must reproduce f on every probe row, including points pushed past the
background's range, to within `tol` of f's spread; otherwise the model is not treated as linear.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, Budget, Evaluator, Explanation, ModelFn
from explainers.errors import FailedPrecondition
from explainers.groups import Groups, ungrouped

TOLERANCE = 1e-4  # of f's spread over the probes: float32 models reproduce to ~1e-6
PROBE_ROWS = 64


@dataclass(frozen=True)
class AffineFit:
    """f(x) ~ intercept + weights @ x; weights (outputs, features)."""

    weights: Array
    intercept: Array  # (outputs,)


def fit_affine(fn: ModelFn, background: Background, tol: float = TOLERANCE) -> AffineFit | None:
    """Central differences around the background mean, verified on probe rows; None if f is not
    affine there."""
    centre = background.weights @ background.data  # (features,)
    step = np.maximum(background.data.std(axis=0), 1e-3)  # (features,) scale-aware steps
    d = centre.size
    X = np.concatenate([centre + np.diag(step), centre - np.diag(step), centre[None]])
    y = fn(X)  # (2d + 1, outputs)
    w = ((y[:d] - y[d:2 * d]) / (2 * step[:, None])).T  # (outputs, features)
    fit = AffineFit(w, y[-1] - w @ centre)
    return fit if _verified(fn, fit, background, centre, tol) else None


def _verified(fn: ModelFn, fit: AffineFit, background: Background, centre: Array,
              tol: float) -> bool:
    """The fit reproduces f on background rows and on points pushed 1.5x past them."""
    rows = background.data[:PROBE_ROWS]  # (probes, features)
    probes = np.concatenate([rows, centre + 1.5 * (rows - centre)])
    y = fn(probes)  # (2 probes, outputs)
    predicted = probes @ fit.weights.T + fit.intercept
    spread = np.maximum(y.max(axis=0) - y.min(axis=0), 1e-12)
    return bool(np.all(np.abs(y - predicted) <= tol * spread))


class LinearShap:
    """Exact interventional Shapley values of an affine model, in closed form."""

    name = "linear"

    def __init__(self, fit: AffineFit) -> None:
        self.fit = fit

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return 1

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the shapes agree with the fit, then compute."""
        ungrouped(self.name, groups)
        if self.fit.weights.shape[1] != x.size:
            raise FailedPrecondition(f"linear: fit has {self.fit.weights.shape[1]} features, "
                                     f"row has {x.size}")
        return self._explain(model, x, background)

    def explain_rows(self, X: Array, background: Background,
                     model: Evaluator | None = None) -> list[Explanation]:
        """Every row of X (rows, features); predictions from one batched model call (from the
        fit when no model is given)."""
        if self.fit.weights.shape[1] != X.shape[1]:
            raise FailedPrecondition(f"linear: fit has {self.fit.weights.shape[1]} features, "
                                     f"rows have {X.shape[1]}")
        mean = background.weights @ background.data  # (features,)
        phi = self.fit.weights[None] * (X - mean)[:, None, :]  # (rows, outputs, features)
        fx = model(X) if model else X @ self.fit.weights.T + self.fit.intercept  # (rows, outputs)
        return [Explanation.build(self.name, p, np.zeros_like(p), background.base_values, f,
                                  evaluations=int(model is not None), converged=True,
                                  budget_exhausted=False)
                for p, f in zip(phi, fx, strict=True)]

    def _explain(self, model: Evaluator, x: Array, background: Background) -> Explanation:
        mean = background.weights @ background.data  # (features,)
        phi = self.fit.weights * (x - mean)[None, :]  # (outputs, features)
        fx = model(x[None])[0]  # (outputs,) the model's own prediction
        return Explanation.build(self.name, phi, np.zeros_like(phi), background.base_values,
                                 fx, evaluations=model.evaluations, converged=True,
                                 budget_exhausted=False)
