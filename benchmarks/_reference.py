"""Reference Shapley values against the *whole* background, for the Shapley benchmark.

- GBDT: exact interventional TreeSHAP (shap.TreeExplainer with an Independent masker sized to
  the whole background) on the scikit-learn model retrained exactly as examples/build_models.py
  does; the ONNX model is its conversion, so this is the exact answer for the margin (the
  log-odds), up to float32 rounding of the probabilities (~1e-4).
- MLPs: phi = sum_b w_b phi(x; z_b), each phi(x; z_b) averaged over K antithetic permutation
  pairs against that row alone, built with np.where (a different code path from the
  estimators'); its standard error sqrt(sum_b w_b^2 s_b^2 / K) is reported with it.

Results are cached in .bench-cache/ keyed by the model file, rows, background and K.
"""

from __future__ import annotations

import hashlib
import warnings

import numpy as np

from benchmarks._models import CACHE, Case
from explainers.base import Array

PAIR_BLOCK = 128  # antithetic pairs per model batch


def reference(case: Case, pairs_per_row: int) -> tuple[Array, Array, str]:
    """(rows, features) reference values, their standard errors, and how they were made."""
    if case.name == "breast_cancer_gbdt":
        return tree_reference(case), np.zeros(case.X.shape), "exact TreeSHAP (shap, sklearn)"
    return sampled_reference(case, pairs_per_row)


def _cached(key: str, compute: object) -> Array:
    path = CACHE / "reference" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.npy"
    if path.exists():
        return np.asarray(np.load(path))
    value = compute() if callable(compute) else np.asarray(compute)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, value)
    return np.asarray(value)


def _key(case: Case, *extra: object) -> str:
    parts = [case.model.sha256, case.X.tobytes().hex()[:4096], str(case.X.shape),
             hashlib.sha256(case.background.data.tobytes()).hexdigest(), *map(str, extra)]
    return "|".join(parts)


def tree_reference(case: Case) -> Array:
    """Exact interventional TreeSHAP of the retrained scikit-learn GBDT: (rows, features)."""

    def compute() -> Array:
        import shap

        from examples.build_models import MODEL_SPECS

        spec = next(s for s in MODEL_SPECS if s.name == case.name)
        data = spec.dataset()
        model = spec.estimator().fit(data.X_train, data.y_train)
        bg = case.background.data
        masker = shap.maskers.Independent(bg, max_samples=len(bg))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explainer = shap.TreeExplainer(model, masker, model_output="raw",
                                           feature_perturbation="interventional")
            return np.asarray(explainer.shap_values(case.X), np.float64)

    return _cached(_key(case, "tree"), compute)


def sampled_reference(case: Case, pairs_per_row: int) -> tuple[Array, Array, str]:
    """Stratified antithetic reference for every explained row: values and standard errors."""

    def compute() -> Array:
        rng = np.random.default_rng(12345)
        return np.stack([np.stack(_row_reference(case, x, pairs_per_row, rng)) for x in case.X])

    out = _cached(_key(case, "pairs", pairs_per_row), compute)  # (rows, 2, features)
    return out[:, 0], out[:, 1], f"{pairs_per_row} antithetic pairs per background row"


def _row_reference(case: Case, x: Array, pairs: int, rng: np.random.Generator) -> tuple[Array,
                                                                                          Array]:
    """phi(x) = sum_b w_b mean_k m_k(x; z_b) and its standard error, for one row."""
    f, bg = case.fn(), case.background
    per_row = np.stack([_single_reference(f, x, z, fz, pairs, rng)
                        for z, fz in zip(bg.data, bg.predictions[:, 0], strict=True)])
    w = bg.weights  # (rows,)
    phi = w @ per_row[:, 0]  # (features,)
    se = np.sqrt((w**2) @ per_row[:, 1] / pairs)
    return phi, se


def _single_reference(f: object, x: Array, z: Array, fz: float, pairs: int,
                      rng: np.random.Generator) -> Array:
    """Mean and variance of antithetic pair means against the one reference row z: (2, d)."""
    d = x.size
    fx = float(f(x[None])[0, 0])  # type: ignore[operator]
    means = []
    for start in range(0, pairs, PAIR_BLOCK):
        n = min(PAIR_BLOCK, pairs - start)
        order = np.argsort(rng.random((n, d)), axis=1)  # (pairs, features) random orders
        rank = np.concatenate([np.argsort(order, axis=1), d - 1 - np.argsort(order, axis=1)])
        inside = rank[:, None, :] < np.arange(1, d)[None, :, None]  # (2n, d - 1, d)
        X = np.where(inside, x, z).reshape(-1, d).astype(np.float32)
        y = f(X).reshape(2 * n, d - 1)  # type: ignore[operator]
        path = np.concatenate([np.full((2 * n, 1), fz), y, np.full((2 * n, 1), fx)], axis=1)
        steps = np.diff(path, axis=1)  # (2n, d): step j adds the feature ranked j
        m = np.take_along_axis(steps, rank, axis=1)  # (2n, features)
        means.append(0.5 * (m[:n] + m[n:]))
    u = np.concatenate(means)  # (pairs, features)
    return np.stack([u.mean(axis=0), u.var(axis=0, ddof=1)])
