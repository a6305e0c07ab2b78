"""Global views through the Datasets service against scikit-learn (issue 14): permutation
importance and partial dependence of the same ONNX model function on the same data, the server
called over gRPC (rows streamed), scikit-learn calling onnxruntime directly in this process."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import onnxruntime as ort
from sklearn.base import BaseEstimator, RegressorMixin
from sklearn.datasets import load_diabetes
from sklearn.inspection import partial_dependence, permutation_importance

from benchmarks._models import MODELS
from service.api.server import start
from service.client.client import Client
from service.config import Settings

MODEL = "diabetes_forest"  # a scikit-learn random forest converted to ONNX
REPEATS = 5


class OnnxRegressor(RegressorMixin, BaseEstimator):  # type: ignore[misc]
    """The bundled ONNX model as a fitted scikit-learn regressor (predict = onnxruntime)."""

    def __init__(self, path: str = "") -> None:
        self.path = path

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> OnnxRegressor:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.session_ = ort.InferenceSession(self.path, options)
        self.input_ = self.session_.get_inputs()[0].name
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        out = self.session_.run(None, {self.input_: np.asarray(X, np.float32)})[0]
        return np.asarray(out, np.float64).reshape(len(X))


def data(rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's diabetes rows (resampled with replacement up to `rows`) and targets."""
    X, y = load_diabetes(return_X_y=True)
    pick = np.random.default_rng(seed).integers(0, len(X), rows) if rows > len(X) \
        else np.arange(rows)
    return X[pick], y[pick]


@contextmanager
def served() -> Iterator[Client]:
    """An in-process server on the bundled models (no result cache) and a client of it."""
    app = start(Settings(models_dir=MODELS, port=0, metrics_port=-1, host="127.0.0.1",
                         result_cache_size=0, reload_interval_seconds=0))
    try:
        with Client(f"127.0.0.1:{app.port}") as client:
            yield client
    finally:
        app.stop(grace=0)


def timed(fn: Callable[[], Any], repeat: int) -> tuple[Any, float]:
    """fn's last result and its median wall time in ms."""
    times, result = [], None
    for _ in range(repeat):
        started = time.perf_counter()
        result = fn()
        times.append(1e3 * (time.perf_counter() - started))
    return result, float(np.median(times))


def importance_row(client: Client, estimator: OnnxRegressor, rows: int, repeat: int) -> str:
    X, y = data(rows)
    ours, t_ours = timed(lambda: client.permutation_importance(
        MODEL, X, y, metric="r2", repeats=REPEATS, seed=1), repeat)
    theirs, t_theirs = timed(lambda: permutation_importance(
        estimator, X, y, scoring="r2", n_repeats=REPEATS, random_state=1), repeat)
    gap = np.abs(ours.values - theirs.importances_mean)
    scale = np.sqrt(ours.std_errors ** 2 + (theirs.importances_std / np.sqrt(REPEATS)) ** 2)
    z = float(np.max(gap / np.maximum(scale, 1e-12)))
    return (f"| permutation importance ({REPEATS} repeats, r2) | {rows} | {t_ours:.0f} | "
            f"{t_theirs:.0f} | {t_theirs / t_ours:.2f} | max gap {gap.max():.3g} "
            f"({z:.1f} standard errors; other permutations) |")


def dependence_row(client: Client, estimator: OnnxRegressor, rows: int, repeat: int) -> str:
    X, _ = data(rows)
    feature = 2  # bmi
    ours, t_ours = timed(lambda: client.partial_dependence(MODEL, X, [feature]), repeat)
    theirs, t_theirs = timed(lambda: partial_dependence(
        estimator, X, [feature], method="brute", kind="average"), repeat)
    gap = float(np.max(np.abs(ours.average - theirs["average"][0])))
    grid = float(np.max(np.abs(ours.grid - theirs["grid_values"][0])))
    return (f"| partial dependence (1 feature, 100 points) | {rows} | {t_ours:.0f} | "
            f"{t_theirs:.0f} | {t_theirs / t_ours:.2f} | max gap {gap:.2g} (grid {grid:.2g}) |")


def run(quick: bool) -> str:
    repeat = 1 if quick else 3
    sizes = (442,) if quick else (442, 2000)
    estimator = OnnxRegressor(str(next((MODELS / MODEL).glob("*/model.onnx")))).fit(
        np.zeros((1, 10)))
    lines = ["## Global views against scikit-learn (issue 14)", "",
             f"`{MODEL}` (a random forest converted to ONNX) on scikit-learn's diabetes rows "
             "(resampled for 2,000). Sidelight: the Datasets service through gRPC from a client "
             "in this process (rows streamed, job admitted and scheduled like any call); "
             "scikit-learn: `permutation_importance` / `partial_dependence(method=\"brute\")` "
             "on an estimator whose `predict` is onnxruntime on the same file. Median of "
             f"{repeat} run(s). Permutation importance uses other permutations than "
             "scikit-learn's, so values agree statistically (the gap in standard errors); the "
             "suite checks equality given the same permutations. Partial dependence is "
             "deterministic and equal.", "",
             "| view | rows | Sidelight ms | scikit-learn ms | scikit-learn / Sidelight | "
             "agreement |", "|---|---|---|---|---|---|"]
    with served() as client:
        for rows in sizes:
            lines.append(importance_row(client, estimator, rows, repeat))
            lines.append(dependence_row(client, estimator, rows, repeat))
    return "\n".join(lines)
