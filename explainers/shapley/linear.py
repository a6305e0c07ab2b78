"""Closed-form attributions for affine models: phi_i = w_i (x_i - E[x_i]).

Whether a model is affine is checked on the function itself, not read off its graph: any ONNX
graph whose explained output is affine in the request's features (LinearRegressor, a
LinearClassifier on the logit scale, Gemm or MatMul+Add, behind a Scaler or an Imputer) passes,
and attributions land on the request's features rather than on internal columns.

The check must not be fooled by the background. A one-row background, or one whose rows are
multiples of each other, spans no volume, so probes built from its rows alone cannot see a
Sigmoid after a MatMul. Probes therefore span every input dimension whatever the background:
the weights come from central differences of one scale per feature (the background's spread,
else |centre| or 1 where the spread is 0 or there are fewer rows than features), and the fit
must reproduce f on at least max(2d + 2, 32) random points up to a few scales around the centre
(outside the background's hull), on background rows and on rows pushed 1.5x past them, to
within `tol` of f's spread. Probes are rounded to the model's input type first, so the fit is
checked on the points the model actually sees. The caller must not probe models whose inputs
are ids (integer or index-like inputs): those are not functions of real-valued features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, Budget, Evaluator, Explanation, ModelFn
from explainers.errors import FailedPrecondition
from explainers.groups import Groups, ungrouped

TOLERANCE = 1e-4  # of f's spread over the probes: float32 models reproduce to ~1e-6
ROUNDING = 1e-3  # the spread counts at least this share of max |f| (float32 offsets)
PROBE_ROWS = 32  # background rows used as probes (and as many pushed past them)
MIN_RANDOM_PROBES = 32  # random probes: at least this many, and 2d + 2
RANDOM_REACH = 2.0  # random probes: centre + RANDOM_REACH * scale * N(0, 1) per feature
NO_SPREAD = 1e-6  # a spread below this share of max(|centre|, 1) counts as none
PROBE_SEED = 20261122  # probes are deterministic: the same fit for the same background


@dataclass(frozen=True)
class AffineFit:
    """f(x) ~ intercept + weights @ x; weights (outputs, features)."""

    weights: Array
    intercept: Array  # (outputs,)


def fit_affine(fn: ModelFn, background: Background, tol: float = TOLERANCE,
               dtype: type = np.float64) -> AffineFit | None:
    """Central differences around the background mean, verified on probes that span every
    feature; None if f is not affine there. `dtype` is the model's input type."""
    centre = _rounded(background.weights @ background.data, dtype)  # (features,)
    step = _rounded(centre + probe_scales(background), dtype) - centre  # (features,)
    if not np.all(step > 0):  # the input type cannot resolve a step at this centre
        return None
    d = centre.size
    X = np.concatenate([centre + np.diag(step), centre - np.diag(step), centre[None]])
    y = fn(_rounded(X, dtype))  # (2d + 1, outputs)
    w = ((y[:d] - y[d:2 * d]) / (2 * step[:, None])).T  # (outputs, features)
    fit = AffineFit(w, y[-1] - w @ centre)
    probes = _rounded(verification_probes(background, centre), dtype)
    return fit if _verified(fn, fit, probes, tol) else None


def probe_scales(background: Background) -> Array:
    """One probe scale per feature: the weighted spread of the background, or max(|centre|, 1)
    where the spread is 0 (below NO_SPREAD of that: float sums of equal rows are not exactly
    equal) or where the rows are too few to span the features: (features,)."""
    centre = background.weights @ background.data  # (features,)
    spread = np.sqrt(background.weights @ (background.data - centre) ** 2)  # (features,)
    fallback = np.maximum(np.abs(centre), 1.0)
    if background.rows <= centre.size:
        return np.asarray(np.maximum(spread, fallback))
    return np.asarray(np.where(spread > NO_SPREAD * fallback, spread, fallback))


def verification_probes(background: Background, centre: Array) -> Array:
    """Random points around the centre in every direction (outside the background's hull),
    background rows, and those rows pushed 1.5x past the centre: (probes, features)."""
    d = centre.size
    rng = np.random.default_rng(PROBE_SEED)
    noise = rng.standard_normal((max(2 * d + 2, MIN_RANDOM_PROBES), d))  # (random, features)
    spread = centre + RANDOM_REACH * probe_scales(background) * noise
    rows = background.data[:PROBE_ROWS]  # (rows, features)
    return np.concatenate([spread, rows, centre + 1.5 * (rows - centre)])


def _verified(fn: ModelFn, fit: AffineFit, probes: Array, tol: float) -> bool:
    """The fit reproduces f on every probe to within tol of f's spread over them."""
    y = fn(probes)  # (probes, outputs)
    if not np.all(np.isfinite(y)):
        return False
    predicted = probes @ fit.weights.T + fit.intercept
    spread = np.maximum(np.ptp(y, axis=0), ROUNDING * np.abs(y).max(axis=0))  # (outputs,)
    return bool(np.all(np.abs(y - predicted) <= tol * spread))


def _rounded(X: Array, dtype: type) -> Array:
    """X as the model sees it (cast to its input type), back in float64."""
    return np.asarray(np.asarray(X).astype(dtype).astype(np.float64))


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
