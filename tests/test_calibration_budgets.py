"""Calibration at every budget the samplers accept, on a 64-feature model (issue 17).

A scikit-learn MLP trained on digits (64 pixels; many equal to the background's in most rows,
so a pixel's contribution often comes from a few background rows), explained on the
probability and the logit of each row's predicted class, by `permutation` from its least
answer (MIN_PAIRS pairs: 4 of the 40 background rows visited) to past the first sweep, and by
`kernel` from its least sound fit; and the bundled GBDT (30 features, sparse attributions)
under `permutation`. Budgets are evaluation caps, so the test is deterministic.

Truth: exact TreeSHAP for the trees; for the MLP, K antithetic pairs against every background
row, built with np.where (not the estimators' code), whose own standard error is added in
quadrature to the reported one (it is 2-16% of it). Each cell holds ~1,000-1,300
(row, feature) pairs: a calibrated estimator covers 95% +- 0.6% there (binomial), so each cell
must lie in [0.90, 0.985] and each (model, method, scale) pooled over its budgets in
[0.93, 0.97]. Before issue 17 the digits cells at 6-50 pairs covered 55-89%, with zero-width
intervals for pixels whose rows had not been visited.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from explainers.base import Array, Background, Budget, Evaluator, Explanation, ModelFn
from explainers.errors import ResourceExhausted
from explainers.shapley.kernel import KernelShap
from explainers.shapley.permutation import MIN_PAIRS, PermutationShapley
from explainers.trees.onnx_trees import parse_onnx_trees
from explainers.trees.tree import TreeShap
from service.plane.targets import apply_scale

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"
BACKGROUND, ROWS, SEEDS, REFERENCE_PAIRS = 40, 12, 2, 200
PAIRS = (MIN_PAIRS, 12, 25, 50, 100, 200)  # 60 pairs end the first sweep over 40 rows
CELL, POOLED = (0.90, 0.985), (0.93, 0.97)


@dataclass(frozen=True)
class Case:
    fn: ModelFn
    background: Background
    X: Array  # (rows, features)
    truth: Array  # (rows, features)
    truth_se: Array  # (rows, features)


def _session(proto: onnx.ModelProto) -> Callable[[Array], Array]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(proto.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    name, output = session.get_inputs()[0].name, session.get_outputs()[1].name
    return lambda X: np.asarray(session.run([output], {name: X.astype(np.float32)})[0],
                                np.float64)


def _digits_mlp() -> tuple[Callable[[Array], Array], Array, Array]:
    """Probabilities of a 64-32-10 MLP (ONNX through skl2onnx), its background and rows."""
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    X, y = load_digits(return_X_y=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence: 150 iterations reach ~92% accuracy
        est = MLPClassifier(hidden_layer_sizes=(32,), max_iter=150, random_state=0)
        est.fit(X[:1200], y[:1200])
    proto = convert_sklearn(est, initial_types=[("x", FloatTensorType([None, 64]))],
                            options={id(est): {"zipmap": False}}, target_opset=17)
    return _session(proto), X[:BACKGROUND].astype(np.float64), X[1200:1200 + ROWS]


def _reference(proba: Callable[[Array], Array], x: Array, bg: Array, column: int,
               rng: np.random.Generator) -> tuple[Array, Array]:
    """phi and its standard error on both scales, (2, 2, features): [scale][value, se]; the
    same paths serve both (one model call per background row)."""
    d, k = x.size, REFERENCE_PAIRS
    out = np.zeros((2, 2, d))
    for z in bg:
        rank = np.argsort(rng.random((k, d)), axis=1).argsort(axis=1)  # (k, d) random ranks
        rank = np.concatenate([rank, d - 1 - rank])  # antithetic: (2k, d)
        inside = rank[:, None, :] < np.arange(d + 1)[None, :, None]  # (2k, d + 1, d)
        p = proba(np.where(inside, x, z).reshape(-1, d))[:, column].reshape(2 * k, d + 1)
        for s, scale in enumerate(("identity", "logit")):
            steps = np.diff(apply_scale(p, scale), axis=1)  # (2k, d): step j adds rank j
            m = np.take_along_axis(steps, rank, axis=1)  # (2k, features)
            pair = 0.5 * (m[:k] + m[k:])  # (k, features)
            out[s, 0] += pair.mean(axis=0) / len(bg)
            out[s, 1] += pair.var(axis=0, ddof=1) / k / len(bg) ** 2
    out[:, 1] = np.sqrt(out[:, 1])
    return out


@pytest.fixture(scope="module")
def digits() -> dict[str, Case]:
    return digits_cases()


def digits_cases() -> dict[str, Case]:
    """The digits MLP on both scales, with its reference values."""
    proba, bg, X = _digits_mlp()
    columns = proba(X).argmax(axis=1)  # each row's predicted class
    rng = np.random.default_rng(7)
    refs = np.stack([_reference(proba, x, bg, c, rng) for x, c in zip(X, columns, strict=True)])
    cases = {}
    for s, scale in enumerate(("identity", "logit")):
        def fn(Z: Array, scale: str = scale, c: int = 0) -> Array:
            return apply_scale(proba(Z)[:, [c]], scale)
        cases[scale] = Case(fn, Background.build(bg, np.zeros((len(bg), 1))), X,
                            refs[:, s, 0], refs[:, s, 1])
    return {**cases, "columns": columns}  # type: ignore[dict-item]


@pytest.fixture(scope="module")
def gbdt() -> Case:
    return gbdt_case()


def gbdt_case() -> Case:
    """The bundled GBDT on its margin (post_transform NONE), exact TreeSHAP as the truth."""
    proto = onnx.load(MODELS / "breast_cancer_gbdt" / "1" / "model.onnx")
    for node in proto.graph.node:
        for attr in node.attribute:
            if node.op_type.startswith("TreeEnsemble") and attr.name == "post_transform":
                attr.s = b"NONE"
    margin = _session(proto)
    bg = np.load(MODELS / "breast_cancer_gbdt" / "background.npy").astype(np.float64)
    X = np.random.default_rng(3).permutation(bg)[:ROWS] * 1.03  # rows near the data
    X = X.astype(np.float32).astype(np.float64)  # as onnxruntime sees them: one truth
    fn: ModelFn = lambda Z: margin(Z)[:, [1]]  # noqa: E731
    background = Background.build(bg, fn(bg))
    tree = TreeShap(parse_onnx_trees(proto), [1])
    truth = np.stack([e.values[0] for e in tree.explain_rows(X, background)])
    return Case(fn, background, X, truth, np.zeros_like(truth))


def _explain(est: object, case: Case, r: int, cap: int, seed: int,
             column: int | None = None) -> Explanation | None:
    fn = case.fn if column is None else (lambda Z: case.fn(Z, c=column))  # type: ignore[call-arg]
    bg = Background.build(case.background.data, fn(case.background.data))
    try:
        return est.explain(Evaluator(fn, 4096, 1e7), case.X[r], bg,  # type: ignore[attr-defined]
                           Budget(np.inf, cap), np.random.default_rng(seed))
    except ResourceExhausted:
        return None


def _cell(case: Case, explain: Callable[[int, int], Explanation | None]) -> Array:
    """Whether each sampled (row, feature) attribution's 95% interval covers the truth;
    attributions reported as exact (zero width) must equal it."""
    inside = []
    for r in range(ROWS):
        for seed in range(SEEDS):
            e = explain(r, 1000 * seed + r)
            if e is None:
                continue
            lo, hi = e.interval(0.95)
            half = (hi - lo)[0] / 2
            exact = half == 0
            assert np.allclose(e.values[0][exact], case.truth[r][exact], atol=1e-9)
            se = e.std_errors[0][~exact]
            widened = half[~exact] * np.sqrt(1 + (case.truth_se[r][~exact] / se) ** 2)
            inside.append(np.abs(e.values[0][~exact] - case.truth[r][~exact]) <= widened)
    return np.concatenate(inside)


def _check(cells: dict[str, Array], cell: tuple[float, float] = CELL,
           pooled_band: tuple[float, float] = POOLED) -> None:
    shares = {k: float(v.mean()) for k, v in cells.items()}
    pooled = float(np.concatenate(list(cells.values())).mean())
    assert all(v.size >= 500 for v in cells.values()), {k: v.size for k, v in cells.items()}
    assert all(cell[0] <= s <= cell[1] for s in shares.values()), shares
    assert pooled_band[0] <= pooled <= pooled_band[1], (pooled, shares)


@pytest.mark.parametrize("scale", ["identity", "logit"])
def test_permutation_is_calibrated_from_its_least_answer_on_64_features(
        digits: dict[str, Case], scale: str) -> None:
    case, columns = digits[scale], digits["columns"]
    est = PermutationShapley()
    cells = {f"{p} pairs": _cell(case, lambda r, seed, p=p: _explain(
        est, case, r, 1 + 2 * p * 63, seed, int(columns[r])))  # type: ignore[misc, index]
        for p in PAIRS}
    _check(cells)


@pytest.mark.parametrize("scale", ["identity", "logit"])
def test_kernel_is_calibrated_from_its_least_sound_fit_on_64_features(
        digits: dict[str, Case], scale: str) -> None:
    case, columns = digits[scale], digits["columns"]
    least = 1 + 2 * BACKGROUND * (64 + 128)  # enumerated pairs and 2d sampled ones, at most
    cells = {f"{m}x least": _cell(case, lambda r, seed, m=m: _explain(
        KernelShap(), case, r, m * least, seed, int(columns[r])))  # type: ignore[misc, index]
        for m in (1, 3)}
    _check(cells)


def test_a_tree_model_under_the_sampler_is_calibrated(gbdt: Case) -> None:
    """From 12 pairs (8 of 100 rows) on, as the MLPs; below, 87-91% (a known miss, kept
    visible here): a tree's few large contributions sit on rows 4-8 visited rows rarely show,
    and the few-rows prior is set for the MLPs (explainers/shapley/moderation.py)."""
    est = PermutationShapley()
    cells = {p: _cell(gbdt, lambda r, seed, p=p: _explain(
        est, gbdt, r, 1 + 2 * p * 29, seed)) for p in PAIRS}  # type: ignore[misc]
    _check({f"{p} pairs": v for p, v in cells.items() if p >= 12})
    assert float(cells[MIN_PAIRS].mean()) >= 0.85


def test_no_zero_width_interval_for_a_player_whose_rows_were_not_visited() -> None:
    """x differs from the background on player 0 in one row only, so player 0's contribution
    comes from that row; with 6 pairs (4 of 40 rows visited) it is usually not among them.
    Its interval must still have width (before issue 17 it had none, and missed). Player 1
    equals x in every row: a dummy, exactly 0 with a zero-width interval (also for kernel)."""
    rng = np.random.default_rng(0)
    d, rows = 8, 40
    W = rng.normal(size=(d, d))

    def f(X: Array) -> Array:
        return (np.tanh(X @ W).sum(axis=1) + 2.0 * X[:, 0] * X[:, 2])[:, None]

    x = rng.normal(size=d)
    data = rng.normal(size=(rows, d))
    data[:, 0], data[17, 0] = x[0], x[0] + 3.0  # player 0 differs in row 17 only
    data[:, 1] = x[1]  # player 1 never differs: a dummy
    bg = Background.build(data, f(data))
    unvisited = 0
    for seed in range(20):
        seen: list[bool] = []

        def g(X: Array, seen: list[bool] = seen) -> Array:
            seen.append(bool(np.any(X[:, 0] == data[17, 0])))  # row 17 in a masked row
            return f(X)

        e = PermutationShapley().explain(Evaluator(g), x, bg, Budget(np.inf, 1 + 2 * 6 * 6),
                                         np.random.default_rng(seed))
        assert e.samples == MIN_PAIRS  # 7 live players: 12 rows per pair
        lo, hi = e.interval(0.95)
        assert np.all(np.delete(hi[0] - lo[0], 1) > 0)
        assert e.values[0, 1] == 0.0 and e.std_errors[0, 1] == 0.0
        unvisited += not any(seen)
    assert unvisited >= 15  # row 17 mostly unvisited: player 0's contribution unseen
    k = KernelShap().explain(Evaluator(f), x, bg, Budget(np.inf, 10**6), np.random.default_rng(0))
    assert k.values[0, 1] == 0.0 and k.std_errors[0, 1] == 0.0
    assert np.all(np.delete(k.std_errors[0], 1) > 0)
