"""The cheap models of issue 17's held-out set, rebuilt here for the overhead benchmark: a
scikit-learn MLP on digits (64 features), a Friedman MLP with 50 features, a 12-feature MLP with
interactions and LightGBM with 40 features and 60 trees. Trained once (a few epochs: only their
cost per row matters here), converted with skl2onnx and cached under .bench-cache/models; each
is loaded through the service's adapter like the models of benchmarks/_models.py."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from benchmarks._models import CACHE, Case, _with_predictions
from explainers.base import Array, Background
from service.models.onnx_model import OnnxModel

BACKGROUND = 100
Data = tuple[Array, Array]  # (rows, features) inputs, targets


def digits() -> Data:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return np.asarray(X, np.float64), np.asarray(y)


def friedman50() -> Data:
    from sklearn.datasets import make_friedman1

    X, y = make_friedman1(1500, n_features=50, random_state=0)
    return np.asarray(X, np.float64), np.asarray(y)


def interactions12() -> Data:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(1500, 12))
    y = X[:, 0] * X[:, 1] + np.sin(X[:, 2]) + X[:, 3] * X[:, 4] * X[:, 5] + X[:, 6:].sum(1)
    return X, y


def classification40() -> Data:
    from sklearn.datasets import make_classification

    X, y = make_classification(n_samples=3000, n_features=40, n_informative=20, random_state=0)
    return np.asarray(X, np.float64), np.asarray(y)


def _mlp_classifier() -> Any:
    from sklearn.neural_network import MLPClassifier

    return MLPClassifier((64,), max_iter=60, random_state=0)


def _mlp_regressor(hidden: tuple[int, ...]) -> Callable[[], Any]:
    def make() -> Any:
        from sklearn.neural_network import MLPRegressor

        return MLPRegressor(hidden_layer_sizes=hidden, max_iter=60, random_state=0)
    return make


def _lightgbm() -> Any:
    from lightgbm import LGBMClassifier

    return LGBMClassifier(n_estimators=60, verbose=-1, random_state=0, n_jobs=1)


# name -> (label, data, estimator, explained column)
SPECS: dict[str, tuple[str, Callable[[], Data], Callable[[], Any], int]] = {
    "digits_mlp": ("digits MLP (64), 64 features", digits, _mlp_classifier, 3),
    "friedman50_mlp": ("Friedman MLP (64-64), 50 features", friedman50,
                       _mlp_regressor((64, 64)), 0),
    "interactions12_mlp": ("MLP (32-16), 12 features", interactions12,
                           _mlp_regressor((32, 16)), 0),
    "lightgbm40": ("LightGBM (60 trees), 40 features", classification40, _lightgbm, 1),
}


def case(name: str, rows: int) -> Case:
    """The model `name` explained on one column (probability or value, identity scale)."""
    label, data, _, column = SPECS[name]
    path = _built(name)
    model = OnnxModel(path / "model.onnx")
    X = data()[0]
    bg = X[:BACKGROUND].astype(np.float32).astype(np.float64)
    output = model.main_output()
    model.measure(bg, output)
    explained = X[-rows:].astype(np.float32).astype(np.float64)
    return _with_predictions(Case(name, label, model, output, column, "identity",
                                  Background.build(bg, bg[:, :1]), explained))


def _built(name: str) -> Path:
    """Train and convert once; later runs load the cached ONNX file."""
    from benchmarks.trees import to_onnx

    directory = CACHE / "models" / name
    if not (directory / "model.onnx").exists():
        _, data, make, _ = SPECS[name]
        X, y = data()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # few epochs on purpose: only the cost matters
            est = make().fit(X, y)
        directory.mkdir(parents=True, exist_ok=True)
        onnx.save(to_onnx(est, X.shape[1]), directory / "model.onnx")
    return directory
