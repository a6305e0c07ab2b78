"""What the gradient methods share: checking the row, the baselines, one request's gradient
calls (counted, timed and planned like model rows), and the Explanation they return.

The methods hold a GradientModel (built once per model and target, like the tree explainer's
parsed trees) and keep the Estimator signature; the `model` Evaluator they are handed only
supplies the evaluations already spent. Gradients and values are on the GradientModel's
target scale (the logit for Softmax/Sigmoid classifiers by default), so base values and
predictions are computed here on that scale, not taken from the background's predictions.
"""

from __future__ import annotations

import numpy as np

from explainers.anytime import require_rows
from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument
from explainers.gradients.backend import GradientModel
from explainers.groups import Groups

CHUNK_ROWS = 1024  # gradient rows per planned call (the backend pins smaller batches)
CELLS = 2**22  # gradient values (rows x columns x p) held at once; larger requests stream
ADDITIVE_TOLERANCE = 1e-6  # |completeness gap| / max(1, |f(x) - f(baseline)|) deemed exact


def check_row(gm: GradientModel, x: Array) -> Array:
    """x as one float64 row of the GradientModel's elements."""
    row = np.asarray(x, np.float64)
    if row.ndim != 1 or row.size != gm.elements:
        raise InvalidArgument(f"x: one row of {gm.elements} elements, got shape {row.shape}")
    return row


def baselines(x: Array, background: Background, groups: Groups | None) -> Array:
    """The background rows (rows, elements), elements in no group kept at x's values (so
    they get no attribution, as the perturbation methods pin them)."""
    if groups is None or not np.any(groups.index < 0):
        return np.asarray(background.data, np.float64)
    return np.where(groups.index < 0, x, background.data)


def block_rows(gm: GradientModel) -> int:
    """Gradient rows per block so a block's gradients stay under CELLS values."""
    return max(1, CELLS // max(1, gm.columns * gm.size))


class Calls:
    """One request's calls to a GradientModel around one row x: gradient rows go through an
    Evaluator (chunked, counted, its rows/second learnt) so the anytime planners can use it;
    forward rows are counted on the same evaluator."""

    def __init__(self, gm: GradientModel, x: Array, model: Evaluator) -> None:
        self.gm, self.X = gm, x[None]
        self.ev = Evaluator(self._packed, chunk_rows=CHUNK_ROWS,
                            rows_per_second=1.0 / max(gm.seconds_per_row, 1e-9),
                            call_overhead_s=0.0, pause=model.pause)
        self.ev.evaluations = model.evaluations + (1 if gm.is_layer else 0)  # the layer's pass
        self.P = gm.point(self.X)  # (1, p)

    def _packed(self, P: Array) -> Array:
        """(rows, p) points -> (rows, columns + columns * p): values then gradients."""
        v, g = self.gm.value_and_grad(self._context(P.shape[0]), P)
        return np.concatenate([v, g.reshape(P.shape[0], -1)], axis=1)

    def _context(self, rows: int) -> Array:
        return np.repeat(self.X, rows, axis=0)

    def grads(self, P: Array) -> tuple[Array, Array]:
        """Values (rows, columns) and gradients (rows, columns, p) at points with x's other
        inputs."""
        k = self.gm.columns
        Y = self.ev(P)
        return Y[:, :k], Y[:, k:].reshape(P.shape[0], k, -1)

    def values(self, P: Array) -> Array:
        """The target (rows, columns) at points with x's other inputs (forward only)."""
        self.ev.evaluations += P.shape[0]
        return self.gm.value(self._context(P.shape[0]), P)

    def count(self, rows: int) -> None:
        """Rows run outside `grads`/`values` (DeepLIFT's reference passes)."""
        self.ev.evaluations += rows

    def require(self, budget: Budget, rows: int, what: str) -> None:
        """RESOURCE_EXHAUSTED before any call when `rows` gradient rows cannot fit."""
        require_rows(self.ev, budget, rows, what)


def explanation(method: str, gm: GradientModel, element_map: Array, groups: Groups | None,
                base: Array, prediction: Array, calls: Calls, values: Array | None = None,
                std_errors: Array | None = None, **meta: object) -> Explanation:
    """The answer: per-group values (default: sums of the element map (outputs, elements),
    exact, so standard errors 0), the map itself, and the backend's notes and build time."""
    g = groups or Groups.each(gm.elements)
    vals = g.sum_elements(element_map) if values is None else values  # (outputs, players)
    diagnostics = (*meta.pop("diagnostics", ()),  # type: ignore[misc]
                   ("gradient_build_s", gm.build_seconds))
    meta.setdefault("converged", True)
    meta.setdefault("budget_exhausted", False)
    meta.setdefault("additive", False)
    return Explanation.build(method, vals, np.zeros_like(vals) if std_errors is None
                             else std_errors, base, prediction,
                             evaluations=calls.ev.evaluations, map=element_map,
                             notes=gm.notes, diagnostics=diagnostics, **meta)


def completeness(element_map: Array, prediction: Array, base: Array) -> tuple[float, bool]:
    """The completeness gap sum(phi) - (f(x) - f(baseline)) of the output where it is
    largest in size, and whether it is small enough to call the answer additive."""
    delta = prediction - base  # (outputs,)
    gap = element_map.sum(axis=1) - delta  # (outputs,)
    worst = float(gap[np.argmax(np.abs(gap))])
    return worst, abs(worst) <= ADDITIVE_TOLERANCE * max(1.0, float(np.max(np.abs(delta))))


class AtX:
    """A method needing one gradient row at x and no baseline (saliency, input x gradient):
    subclasses say what each variable's gradient becomes (`_per_variable`)."""

    name = ""

    def __init__(self, gm: GradientModel) -> None:
        self.gm = gm

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        return 1

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """One gradient row at x, if the budget allows it; the background is not used."""
        calls = Calls(self.gm, check_row(self.gm, x), model)
        calls.require(budget, 1, self.name)
        return self._explain(calls, groups)

    def _explain(self, calls: Calls, groups: Groups | None) -> Explanation:
        fx, g = calls.grads(calls.P)  # (1, outputs), (1, outputs, p)
        heat = self.gm.to_elements(self._per_variable(g[0], calls.P[0]))  # (outputs, elements)
        return explanation(self.name, self.gm, heat, groups, np.zeros_like(fx[0]), fx[0], calls,
                           diagnostics=self._diagnostics())

    def _per_variable(self, grad: Array, point: Array) -> Array:
        """(outputs, p) gradient and (p,) point -> (outputs, p) attributions."""
        raise NotImplementedError

    def _diagnostics(self) -> tuple[tuple[str, float], ...]:
        return ()
