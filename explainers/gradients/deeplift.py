"""`deeplift` and `deepshap`: DeepLIFT's Rescale rule (Shrikumar, Greenside & Kundaje 2017)
against a reference, and its average over background rows (Lundberg & Lee 2017's DeepSHAP).

The rule as a gradient (field notes): every elementwise nonlinearity y = f(a) on the path
(Relu, LeakyRelu, Elu, Sigmoid, Tanh, Softplus) is rewritten in a copy of the graph as
y = y0 + m (a - a0), with the reference's a0 and y0 and the multiplier m = (y - y0) / (a - a0)
fed as inputs (f'(a) where a = a0, Captum's convention); the gradient of that graph times
(x - reference) is DeepLIFT's attribution. Linear ops pass multipliers unchanged, so on a
network whose only nonlinearities are rewritten the rewritten graph is affine in x and the
attributions are exactly complete: sum(phi) = f(x) - f(reference). Other nonlinearities
(MaxPool, Softmax inside attention, products of two activations) keep their gradient at x,
and the completeness gap, always reported, says how far that moved the answer.

`deeplift` uses one reference: the background's weighted mean point (its one row, for the
modality's baseline; for text, the mean of the baseline tokens' embeddings). `deepshap` runs
DeepLIFT against every background row and averages by weight, complete against the weighted
mean prediction. Text models: references live in embedding space, sums are per token.

Needs a GradientModel built with rescale=True. Cost: one forward row at x, one per reference
(the exposed a and y), and one gradient row per reference.
"""

from __future__ import annotations

import numpy as np

from explainers.base import Array, Background, Budget, Evaluator, Explanation
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


class DeepLift:
    """DeepLIFT (Rescale) against the mean reference, or averaged over every background row
    (`average`, the `deepshap` method); one instance per rescaled GradientModel."""

    def __init__(self, gm: GradientModel, average: bool = False) -> None:
        if not gm.rescale:
            raise InvalidArgument("deeplift: needs a GradientModel built with rescale=True")
        self.gm, self.average = gm, average
        self.name = "deepshap" if average else "deeplift"

    def expected_evaluations(self, n_features: int, background: Background) -> int | None:
        refs = background.rows if self.average else 1
        return 2 + 3 * refs  # f(x) and x's exposed pass; per reference f, exposed, gradient

    def explain(self, model: Evaluator, x: Array, background: Background, budget: Budget,
                rng: np.random.Generator, groups: Groups | None = None) -> Explanation:
        """Check every reference pass fits the budget, then compute."""
        row = check_row(self.gm, x)
        calls = Calls(self.gm, row, model)
        P0 = self.gm.point(baselines(row, background, groups))  # (refs, p)
        weights = background.weights
        if not self.average:
            P0, weights = (weights @ P0)[None], np.ones(1)
        calls.require(budget, self.expected_evaluations(row.size, background) or 0, self.name)
        return self._explain(calls, P0, weights, groups)

    def _explain(self, calls: Calls, P0: Array, weights: Array,
                 groups: Groups | None) -> Explanation:
        fx = calls.values(calls.P)[0]  # (outputs,)
        base = weights @ calls.values(P0)  # (outputs,)
        total = np.zeros((self.gm.columns, self.gm.size))  # (outputs, p)
        step = block_rows(self.gm)
        for start in range(0, P0.shape[0], step):
            refs, w = P0[start:start + step], weights[start:start + step]  # (block, p)
            feeds = self.gm.reference_feeds(calls.X, calls.P, refs)
            rows = refs.shape[0]
            _, g = self.gm.value_and_grad(np.repeat(calls.X, rows, axis=0),
                                          np.repeat(calls.P, rows, axis=0), feeds)
            calls.count(1 + 2 * rows)  # the exposed pass at x and per reference, gradients
            total += np.einsum("b,bkp,bp->kp", w, g, calls.P - refs)
        heat = self.gm.to_elements(total)  # (outputs, elements)
        gap, exact = completeness(heat, fx, base)
        return explanation(self.name, self.gm, heat, groups, base, fx, calls, additive=exact,
                           diagnostics=(("completeness_gap", gap),
                                        ("baselines", float(P0.shape[0])),
                                        ("rescaled_nonlinearities", float(len(self.gm.rescaled)))))
