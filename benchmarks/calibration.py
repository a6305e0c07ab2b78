"""Calibration at small budgets (issue 17): coverage of the 95% intervals at 5-200 ms, in process
and through the gRPC server, on models the Shapley benchmark does not use.

Models (each with 100 background rows, trained here, ONNX through skl2onnx): a scikit-learn MLP
on digits (64 pixels; explained on the probability and on the logit of each row's predicted
class), an MLP on Friedman #1 with 50 features (45 of them noise) and LightGBM with its
defaults on 40 features (the logit of class 1, read off the margin). Truth: exact TreeSHAP for
LightGBM; for the MLPs, REFERENCE_PAIRS antithetic pairs against every background row (np.where,
not the estimators' code), whose standard error is added in quadrature to the reported one.

In process: the estimator with the budget less the data plane's response reserve (as the
server plans it). Through gRPC: Explain calls to `sidelight` in its own process, one client,
result cache off. A cell is the share of (row, feature) truths inside the reported interval;
attributions reported as exact (zero width) count as inside only when they equal the truth.
"""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import onnx

from benchmarks._models import CACHE
from benchmarks._server import server
from explainers.base import Array, Background, Budget, Evaluator
from explainers.errors import SidelightError
from explainers.registry import build_registry
from service.api.tensors import from_array
from service.models.onnx_model import OnnxModel
from service.plane.reserve import reserve_s
from service.plane.targets import apply_scale
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

BUDGETS_MS = (5.0, 10.0, 25.0, 50.0, 100.0, 200.0)
METHODS = ("permutation", "kernel")
BACKGROUND = 100
REFERENCE_PAIRS = 200
REPO = CACHE / "calibration_repo"
BEFORE = Path(__file__).with_name("calibration_before.md")  # measured once, with its command


@dataclass(frozen=True)
class Target:
    """One explained function of one model: its rows, their classes and the truth."""

    model: str
    label: str
    scale: str  # identity | logit
    X: Array  # (rows, features)
    classes: Array  # (rows,) explained column per row
    truth: Array  # (rows, features)
    truth_se: Array  # (rows, features)


def run(quick: bool) -> str:
    rows = 4 if quick else 8
    targets = _targets(rows)
    cells: dict[tuple[str, str, str, float], Cell] = {}
    for t in targets:
        model = _onnx(t.model)
        for method in METHODS:
            for b in BUDGETS_MS:
                cells[(t.label, method, "in process", b)] = _in_process(model, t, method, b)
    with server(REPO) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        for t in targets:
            _warm(stub, t)
            for method in METHODS:
                for b in BUDGETS_MS:
                    cells[(t.label, method, "gRPC", b)] = _through_grpc(stub, t, method, b)
    return _table(targets, cells, rows)


# --- models and truths ------------------------------------------------------------------------
def _targets(rows: int) -> list[Target]:
    """Write the three models into a repository (once) and return the explained functions."""
    out = []
    for name in ("digits_mlp", "friedman50_mlp", "lightgbm_defaults"):
        X = _write(name)[:rows]
        model = _onnx(name)
        out += [lightgbm_target(name, X)] if name == "lightgbm_defaults" else \
            mlp_targets(name, model, X, _reference)
    return out


def lightgbm_target(name: str, X: Array) -> Target:
    """LightGBM's logit of class 1, against exact TreeSHAP."""
    truth = _tree_truth(name, X)
    return Target(name, "LightGBM defaults, 40 features", "logit", X, np.ones(X.shape[0], int),
                  truth, np.zeros_like(truth))


Reference = Callable[[str, OnnxModel, Array, Array, str], tuple[Array, Array]]


def mlp_targets(name: str, model: OnnxModel, X: Array, reference: Reference) -> list[Target]:
    """The digits MLP (each row's predicted class, on both scales) or the Friedman MLP, with
    reference values and standard errors from `reference`."""
    classes = model.predict(X, model.main_output()).argmax(axis=1) \
        if name == "digits_mlp" else np.zeros(X.shape[0], int)
    out = []
    for scale in (("identity", "logit") if name == "digits_mlp" else ("identity",)):
        values, se = reference(name, model, X, classes, scale)
        label = {"digits_mlp": f"digits MLP, 64 features, {scale}",
                 "friedman50_mlp": "Friedman MLP, 50 features"}[name]
        out.append(Target(name, label, scale, X, classes, values, se))
    return out


def _write(name: str) -> Array:
    """The model's Triton-layout entry (idempotent); returns the rows to explain."""
    entry = REPO / name
    if not (entry / "1" / "model.onnx").exists():
        proto, bg, X = _train(name)
        (entry / "1").mkdir(parents=True, exist_ok=True)
        onnx.save(proto, entry / "1" / "model.onnx")
        np.save(entry / "background.npy", bg.astype(np.float32))
        np.save(entry / "rows.npy", X.astype(np.float32))
        (entry / "explain.yaml").write_text(
            "method: permutation\nbudget_ms: 100\nbackground: {path: background.npy}\n")
    return np.load(entry / "rows.npy").astype(np.float64)


def _train(name: str) -> tuple[onnx.ModelProto, Array, Array]:
    """(ONNX model, background rows, held-out rows)."""
    from benchmarks.trees import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "digits_mlp":
            from sklearn.datasets import load_digits
            from sklearn.neural_network import MLPClassifier
            X, y = load_digits(return_X_y=True)
            est = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=0)
            est.fit(X[:1400], y[:1400])
            return to_onnx(est, 64), X[:BACKGROUND], X[1400:]
        if name == "friedman50_mlp":
            from sklearn.datasets import make_friedman1
            from sklearn.neural_network import MLPRegressor
            X, y = make_friedman1(n_samples=3000, n_features=50, random_state=0)
            est = MLPRegressor(hidden_layer_sizes=(64, 64), max_iter=300, random_state=0)
            est.fit(X[:2500], y[:2500])
            return to_onnx(est, 50), X[:BACKGROUND], X[2500:]
        from benchmarks.trees_deep import lightgbm_defaults
        m = lightgbm_defaults()
        return to_onnx(m.native, 40), m.X[:BACKGROUND], m.X[5000:]


def _onnx(name: str) -> OnnxModel:
    model = OnnxModel(REPO / name / "1" / "model.onnx")
    bg = np.load(REPO / name / "background.npy")
    model.measure(bg, model.main_output())
    return model


def _fn(model: OnnxModel, t: Target, column: int) -> Callable[[Array], Array]:
    """The explained function as the data plane builds it (logit of LightGBM off the margin)."""
    out, margin = model.main_output(), t.model == "lightgbm_defaults"
    scale = "identity" if margin else t.scale
    return lambda X: apply_scale(model.predict(X, out, margin)[:, [column]], scale)


def _tree_truth(name: str, X: Array) -> Array:
    from explainers.trees.onnx_trees import parse_onnx_trees, predict_margin
    from explainers.trees.tree import TreeShap

    parsed = parse_onnx_trees(onnx.load(REPO / name / "1" / "model.onnx"))
    data = np.load(REPO / name / "background.npy").astype(np.float64)
    bg = Background.build(data, predict_margin(parsed, data)[:, [1]])
    return np.stack([e.values[0] for e in TreeShap(parsed, [1]).explain_rows(X, bg)])


def _reference(name: str, model: OnnxModel, X: Array, classes: Array,
               scale: str) -> tuple[Array, Array]:
    """Cached (rows, features) values and standard errors."""
    key = hashlib.sha256(f"{name}|{scale}|{REFERENCE_PAIRS}|{X.tobytes().hex()}|"
                         f"{classes.tolist()}".encode()).hexdigest()[:24]
    path = CACHE / "reference" / f"calibration_{key}.npy"
    if not path.exists():
        bg = np.load(REPO / name / "background.npy").astype(np.float64)
        rng = np.random.default_rng(12345)
        out = np.stack([_row_reference(model, x, bg, int(c), scale, rng)
                        for x, c in zip(X, classes, strict=True)])  # (rows, 2, features)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, out)
    out = np.load(path)
    return out[:, 0], out[:, 1]


def _row_reference(model: OnnxModel, x: Array, bg: Array, column: int, scale: str,
                   rng: np.random.Generator) -> Array:
    """phi = mean over background rows of K antithetic pair means against that row: (2, d)."""
    d, k, out = x.size, REFERENCE_PAIRS, np.zeros((2, x.size))
    for z in bg:
        rank = np.argsort(rng.random((k, d)), axis=1).argsort(axis=1)  # (k, d)
        rank = np.concatenate([rank, d - 1 - rank])  # (2k, d) antithetic
        inside = rank[:, None, :] < np.arange(d + 1)[None, :, None]  # (2k, d + 1, d)
        y = model.predict(np.where(inside, x, z).reshape(-1, d), model.main_output())
        path = apply_scale(y[:, column], scale).reshape(2 * k, d + 1)
        m = np.take_along_axis(np.diff(path, axis=1), rank, axis=1)  # (2k, features)
        pair = 0.5 * (m[:k] + m[k:])  # (k, features)
        out[0] += pair.mean(axis=0) / len(bg)
        out[1] += pair.var(axis=0, ddof=1) / k / len(bg) ** 2
    out[1] = np.sqrt(out[1])
    return out


# --- measurements -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Cell:
    inside: Array  # (pairs,) bool
    zero_width_misses: int
    pairs: float  # mean sampling units per answered row
    refused: int
    rows: int


def _covered(values: Array, lo: Array, hi: Array, se: Array, truth: Array,
             truth_se: Array) -> tuple[Array, int]:
    """Inside the interval widened by the reference's own noise; zero width: exact match."""
    half, mid = (hi - lo) / 2, (hi + lo) / 2
    exact = half == 0
    with np.errstate(over="ignore", invalid="ignore"):
        widened = half * np.sqrt(1 + (truth_se / np.maximum(se, 1e-300)) ** 2)
    inside = np.where(exact, np.abs(values - truth) <= 1e-9 * (1 + np.abs(truth)),
                      np.abs(mid - truth) <= widened)
    return inside, int(np.sum(exact & ~inside))


def _in_process(model: OnnxModel, t: Target, method: str, budget_ms: float) -> Cell:
    est, bg_data = build_registry()[method], np.load(REPO / t.model / "background.npy")
    inside, misses, pairs, refused = [], 0, [], 0
    for i, x in enumerate(t.X):
        fn = _fn(model, t, int(t.classes[i]))
        bg = Background.build(bg_data.astype(np.float64), fn(bg_data))
        seconds = budget_ms / 1e3 - reserve_s(budget_ms / 1e3, 1)
        ev = Evaluator(fn, model.chunk_rows, model.rows_per_second, dtype=model.batch_dtype)
        try:
            e = est.explain(ev, x, bg, Budget.of_seconds(seconds), np.random.default_rng(i))
        except SidelightError:
            refused += 1
            continue
        lo, hi = e.interval(0.95)
        ok, miss = _covered(e.values[0], lo[0], hi[0], e.std_errors[0], t.truth[i],
                            t.truth_se[i])
        inside.append(ok)
        misses += miss
        pairs.append(e.samples)
    return _cell(inside, misses, pairs, refused, len(t.X))


def _warm(stub: pb_grpc.ExplainerStub, t: Target) -> None:
    """One call per model first, so the server has measured and fitted what it caches."""
    for _ in range(3):
        _call(stub, t, 0, "permutation", 200.0)


def _call(stub: pb_grpc.ExplainerStub, t: Target, i: int, method: str,
          budget_ms: float) -> pb.ExplainResponse | None:
    target = pb.Target(classes=[int(t.classes[i])], scale=t.scale)
    request = pb.ExplainRequest(model=t.model, inputs=[from_array("input", t.X[i:i + 1])],
                                method=method, target=target, budget_ms=budget_ms, seed=i + 1)
    try:
        return stub.Explain(request, timeout=budget_ms / 1e3 + 1.0)
    except grpc.RpcError as err:
        if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
            raise
        return None


def _through_grpc(stub: pb_grpc.ExplainerStub, t: Target, method: str, budget_ms: float) -> Cell:
    inside, misses, pairs, refused = [], 0, [], 0
    for i in range(len(t.X)):
        r = _call(stub, t, i, method, budget_ms)
        if r is None or r.rows[0].status not in ("", "OK"):
            refused += 1
            continue
        row = r.rows[0]
        ok, miss = _covered(np.array(row.attributions), np.array(row.ci_low),
                            np.array(row.ci_high), np.array(row.std_errors), t.truth[i],
                            t.truth_se[i])
        inside.append(ok)
        misses += miss
        pairs.append(row.samples)
        time.sleep(0.002)
    return _cell(inside, misses, pairs, refused, len(t.X))


def _cell(inside: list[Array], misses: int, pairs: list[int], refused: int, rows: int) -> Cell:
    flat = np.concatenate(inside) if inside else np.zeros(0, bool)
    return Cell(flat, misses, float(np.mean(pairs)) if pairs else 0.0, refused, rows)


# --- report -----------------------------------------------------------------------------------
def _table(targets: list[Target], cells: dict[tuple[str, str, str, float], Cell],
           rows: int) -> str:
    head = " | ".join(f"{b:.0f} ms" for b in BUDGETS_MS)
    lines = ["## Calibration at small budgets (issue 17)", "",
             __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), "",
             f"{rows} rows per model, one call per row and cell. Each cell: coverage of the 95% "
             "intervals (target 93-97%), the mean sampling units per answer (permutation "
             "pairs, kernel coalition pairs) and, where some were, the rows refused "
             "(RESOURCE_EXHAUSTED: the least sound answer does not fit). *0-width misses* = "
             "attributions reported with a zero-width interval that differ from the truth "
             "(before issue 17: 25-159 per cell at 10 ms).", "",
             f"| model | method | path | {head} | 0-width misses |",
             "|---|---|---|" + "---|" * len(BUDGETS_MS) + "---|"]
    for t in targets:
        for method in METHODS:
            for path in ("in process", "gRPC"):
                cs = [cells[(t.label, method, path, b)] for b in BUDGETS_MS]
                lines.append(f"| {t.label} | {method} | {path} | "
                             + " | ".join(_show(c) for c in cs)
                             + f" | {sum(c.zero_width_misses for c in cs)} |")
    every = [c for c in cells.values() if c.inside.size]
    pooled = float(np.concatenate([c.inside for c in every]).mean())
    share = sum(0.93 <= c.inside.mean() <= 0.97 for c in every)
    lines += ["", f"All answered cells: **{pooled:.1%}** of "
              f"{sum(c.inside.size for c in every):,} (row, feature) pairs; {share} of "
              f"{len(every)} cells within 93-97%. A cell holds {rows} rows x 40-64 features: "
              "its binomial spread is about +-1-1.5 points, more with the correlation between "
              "one row's features.", "", BEFORE.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def _show(c: Cell) -> str:
    if not c.inside.size:
        return f"refused {c.refused}/{c.rows}"
    refused = f", {c.refused} refused" if c.refused else ""
    return f"{c.inside.mean():.1%} ({c.pairs:.0f}{refused})"


