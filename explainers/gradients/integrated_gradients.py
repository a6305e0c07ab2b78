"""`integrated_gradients`: (x - b) times the gradient averaged along the straight path from a
baseline b to x (Sundararajan, Taly & Yan 2017), by Gauss-Legendre quadrature (Captum's
default rule).

The baseline is the background: one row (the modality's baseline: zeros, a mask token) gives
plain integrated gradients; several rows give the weighted average of their integrated
gradients, the deterministic form of expected gradients (Erion et al. 2021; shap's
GradientExplainer and Captum's GradientShap sample the same average), complete against the
weighted mean prediction. Text models: the path runs between the embeddings of the baseline's
tokens and of x's (the rest of the model sees x's tokens, as Captum's LayerIntegratedGradients
does); attributions are summed per token.

The answer is complete when sum(phi) = f(x) - f(b); the quadrature error shows as the
completeness gap, reported in the diagnostics with the steps used. Steps start at MIN_STEPS
and double while the next rule is predicted to fit the budget (its time measured from the
last rule's, doubled), until the gap is at most the accuracy goal. Gauss-Legendre rules are
not nested, so a doubling recomputes every node: the total cost is under twice the last
rule's. Beyond PANEL nodes the rule is composite (PANEL-node rules on equal panels), which
also suits the kinks of ReLU networks. `steps` fixes the rule instead.
"""

from __future__ import annotations

import functools
import time

import numpy as np

from explainers.anytime import require_stop_rule
from explainers.base import SAFETY, Array, Background, Budget, Evaluator, Explanation
from explainers.errors import InvalidArgument
from explainers.gradients.backend import GradientModel
from explainers.gradients.common import (
    Calls,
    baselines,
    block_rows,
    check_row,
    completeness,
    explanation,
)
from explainers.groups import Groups

MIN_STEPS = 8
PANEL = 64  # nodes per Gauss-Legendre panel: leggauss(64) is cheap; leggauss(512) is 0.4 s
MAX_STEPS = 4096


@functools.lru_cache(maxsize=32)
def gauss_legendre(steps: int) -> tuple[Array, Array]:
    """Nodes (steps,) in (0, 1) and weights summing to 1: one rule up to PANEL nodes, else
    steps / PANEL panels of PANEL nodes (steps a multiple of PANEL)."""
    per = min(steps, PANEL)
    u, w = np.polynomial.legendre.leggauss(per)
    panels = max(1, steps // PANEL)
    left = np.arange(panels)[:, None] / panels  # (panels, 1)
    t = (left + (u[None] + 1) / (2 * panels)).ravel()  # (steps,)
    weights = np.tile(w / (2 * panels), panels)  # (steps,)
    return t, weights


class IntegratedGradients:
    """Anytime integrated gradients (expected gradients over several baseline rows); one
    instance per GradientModel (model and target)."""

    name = "integrated_gradients"

    def __init__(self, gm: GradientModel, steps: int | None = None) -> None:
        if steps is not None and not (1 <= steps <= PANEL or
                                      (steps % PANEL == 0 and steps <= MAX_STEPS)):
            raise InvalidArgument(f"integrated_gradients.steps: 1..{PANEL}, or a multiple of "
                                  f"{PANEL} up to {MAX_STEPS}; got {steps}")
        self.gm, self.steps = gm, steps

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        """Rows of a fixed rule (gradients plus the end points); None when anytime."""
        return None if self.steps is None else (self.steps + 1) * background.rows + 1

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check the first rule fits the budget (and that an anytime run can stop)."""
        if self.steps is None:
            require_stop_rule(budget)
        row = check_row(self.gm, x)
        calls = Calls(self.gm, row, model)
        P0 = self.gm.point(baselines(row, background, groups))  # (refs, p)
        first = self.steps or MIN_STEPS
        calls.require(budget, (first + 1) * P0.shape[0] + 1, self.name)
        return self._explain(calls, P0, background.weights, budget, groups)

    def _explain(self, calls: Calls, P0: Array, weights: Array, budget: Budget,
                 groups: Groups | None) -> Explanation:
        fx = calls.values(calls.P)[0]  # (outputs,)
        base = weights @ calls.values(P0)  # (outputs,)
        steps = self.steps or MIN_STEPS
        while True:
            start = time.perf_counter()
            heat = self.gm.to_elements(integrate(calls, P0, weights, steps))  # (outputs, el.)
            gap, exact = completeness(heat, fx, base)
            met = budget.target_error is not None and abs(gap) <= budget.target_error
            if self.steps is not None or met or 2 * steps > MAX_STEPS:
                break
            if not _fits(calls, budget, 2 * (time.perf_counter() - start),
                         2 * steps * P0.shape[0]):
                break
            steps *= 2
        return explanation(self.name, self.gm, heat, groups, base, fx, calls,
                           additive=exact, converged=met or self.steps is not None,
                           budget_exhausted=not met and self.steps is None,
                           diagnostics=(("steps", float(steps)), ("completeness_gap", gap),
                                        ("baselines", float(P0.shape[0]))))


def integrate(calls: Calls, P0: Array, weights: Array, steps: int) -> Array:
    """sum_b weights_b (P - P0_b) * int_0^1 grad(P0_b + t (P - P0_b)) dt: (outputs, p), the
    quadrature streamed over (baseline, node) pairs in blocks."""
    t, w = gauss_legendre(steps)  # (steps,)
    delta = calls.P - P0  # (refs, p)
    pair_ref = np.repeat(np.arange(P0.shape[0]), steps)  # (pairs,)
    pair_node = np.tile(np.arange(steps), P0.shape[0])  # (pairs,)
    total = np.zeros((calls.gm.columns, P0.shape[1]))  # (outputs, p)
    block = block_rows(calls.gm)
    for start in range(0, pair_ref.size, block):
        r, n = pair_ref[start:start + block], pair_node[start:start + block]
        path = P0[r] + t[n, None] * delta[r]  # (block, p)
        _, g = calls.grads(path)  # (block, outputs, p)
        total += np.einsum("b,bkp,bp->kp", weights[r] * w[n], g, delta[r])
    return total


def _fits(calls: Calls, budget: Budget, seconds: float, rows: int) -> bool:
    """Whether a rule predicted to take `seconds` and `rows` gradient rows fits the budget."""
    cap = calls.ev.affordable_rows(Budget(np.inf, budget.max_evaluations))
    return rows <= cap and seconds <= SAFETY * budget.remaining()
