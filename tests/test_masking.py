"""Masked rows: the path builder (step-major or path-major) and the bitwise select give the
samplers exactly the attributions the path-major np.where builder gave, on the bundled ONNX
models."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from explainers.base import Array, Background, Budget, Evaluator, Explanation
from explainers.groups import Groups
from explainers.masking import path_values, select
from explainers.shapley.kernel import KernelShap
from explainers.shapley.permutation import PermutationShapley
from service.models.onnx_model import OnnxModel

MODELS = Path(__file__).resolve().parents[1] / "examples" / "models"


def path_major_values(ev: Evaluator, x: Array, Z: Array, ranks: Array,
                      groups: Groups | None = None) -> Array:
    """The builder before: rows path by path, selected with np.where (the oracle)."""
    d = ranks.shape[1]
    step = max(1, ev.chunk_rows // (d - 1))
    ranks_e = ranks if groups is None else groups.expand_ranks(ranks)
    parts = []
    for i in range(0, ranks.shape[0], step):
        inside = ranks_e[i:i + step, None, :] < np.arange(1, d)[None, :, None]  # (n, d-1, el.)
        X = np.where(inside, x.astype(ev.dtype), Z[i:i + step].astype(ev.dtype)[:, None, :])
        parts.append(ev(X.reshape(-1, x.size)))
    return np.concatenate(parts).reshape(ranks.shape[0], d - 1, -1)


def where_coalition_values(ev: Evaluator, masks: Array, x: Array, background: Background,
                           groups: Groups | None = None) -> Array:
    """Coalition values before: np.where against every background row (the oracle)."""
    rows, out = background.rows, []
    block = max(1, ev.chunk_rows // rows)
    for start in range(0, masks.shape[0], block):
        m = masks[start:start + block] if groups is None else groups.expand(
            masks[start:start + block])
        X = np.where(m[:, None, :], x.astype(ev.dtype), background.data.astype(ev.dtype)[None])
        y = ev(X.reshape(-1, x.size)).reshape(m.shape[0], rows, -1)
        out.append(np.einsum("cbk,b->ck", y, background.weights))
    return np.concatenate(out)


def where_hybrid_values(ev: Evaluator, masks: Array, x: Array, z: Array,
                        groups: Groups | None = None) -> Array:
    m = masks if groups is None else groups.expand(masks)
    return ev(np.where(m, x.astype(ev.dtype), z.astype(ev.dtype)).reshape(-1, x.size))


def bundled(name: str, path_major: bool | None = None
            ) -> tuple[Callable[[], Evaluator], Array, Background]:
    """A bundled model's probability of class 1 through the service adapter, a held-out-like
    row (the last background row, perturbed) and the first rows as background. Paths are fed
    in the order the service picks for the model unless `path_major` says."""
    model = OnnxModel(MODELS / name / "1" / "model.onnx")
    data = np.load(MODELS / name / "background.npy").astype(np.float64)
    output = model.main_output()
    major = model.has_trees if path_major is None else path_major

    def f(X: Array) -> Array:
        return model.predict(X, output)[:, [1]]

    def ev() -> Evaluator:
        return Evaluator(f, 997, 1e6, dtype=model.batch_dtype, path_major=major)

    bg = data[:40]
    return ev, data[-1] * 1.01, Background.build(bg, f(bg))


def same(a: Explanation, b: Explanation) -> None:
    np.testing.assert_array_equal(a.values, b.values)
    np.testing.assert_array_equal(a.std_errors, b.std_errors)
    assert a.evaluations == b.evaluations


@pytest.mark.parametrize("name", ["breast_cancer_mlp", "breast_cancer_gbdt"])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("path_major", [False, True])
def test_permutation_gives_the_path_major_attributions_bit_for_bit(
        name: str, grouped: bool, path_major: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same seed, same rows (in either order within each model call): the same attributions.
    An evaluator chunk that is not a multiple of the path length splits paths across calls;
    groups leave two elements pinned to x (rank -1)."""
    ev, x, bg = bundled(name, path_major)
    groups = Groups.build(np.r_[np.arange(28) // 3, -1, -1]) if grouped else None

    def explain() -> Explanation:
        return PermutationShapley().explain(ev(), x, bg, Budget(np.inf, 12_000),
                                            np.random.default_rng(3), groups)

    after = explain()
    monkeypatch.setattr("explainers.shapley.permutation.path_values", path_major_values)
    same(after, explain())


@pytest.mark.parametrize("name", ["breast_cancer_mlp", "breast_cancer_gbdt"])
@pytest.mark.parametrize("rows_per_pair", ["all", "one"])
def test_kernel_gives_the_np_where_attributions_bit_for_bit(
        name: str, rows_per_pair: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernel against every background row (coalition rows) and one row per pair (hybrid)."""
    ev, x, bg = bundled(name)
    kernel = KernelShap(sample_background=rows_per_pair == "one")

    def explain() -> Explanation:
        return kernel.explain(ev(), x, bg, Budget(np.inf, 80_000), np.random.default_rng(5))

    after = explain()
    monkeypatch.setattr("explainers.shapley.kernel.coalition_values", where_coalition_values)
    monkeypatch.setattr("explainers.shapley.kernel.hybrid_values", where_hybrid_values)
    same(after, explain())


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_select_is_np_where_bit_for_bit_with_nan_inf_and_signed_zeros(dtype: type) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=7)
    x[[1, 2]] = [-0.0, np.inf]
    z = rng.normal(size=(3, 5, 7))
    z[0, 1, [0, 3]] = [np.nan, -0.0]
    mask = rng.random((3, 1, 7)) < 0.5
    got, want = select(mask, x, z, dtype), np.where(mask, x.astype(dtype), z.astype(dtype))
    assert got.dtype == want.dtype and got.shape == want.shape
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))


def test_path_values_are_in_path_order_whatever_the_chunk() -> None:
    """f = the row itself, so every output lands at its (path, step) for any chunk."""
    rng = np.random.default_rng(1)
    x, Z = rng.normal(size=5), rng.normal(size=(9, 5))
    ranks = np.argsort(rng.random((9, 5)), axis=1)

    def f(X: Array) -> Array:
        return np.array(X, np.float64)

    want = path_major_values(Evaluator(f, 10**6), x, Z, ranks)
    for chunk in (1, 3, 4, 7, 36, 10**6):
        for major in (False, True):
            got = path_values(Evaluator(f, chunk, path_major=major), x, Z, ranks)
            np.testing.assert_array_equal(got, want)


def test_tree_ensembles_get_paths_one_after_the_other() -> None:
    """The service feeds tree ensembles path-major (they run faster on alike consecutive
    rows) and everything else step-major (cheaper to build)."""
    assert OnnxModel(MODELS / "breast_cancer_gbdt" / "1" / "model.onnx").has_trees
    assert OnnxModel(MODELS / "diabetes_forest" / "1" / "model.onnx").has_trees
    assert not OnnxModel(MODELS / "breast_cancer_mlp" / "1" / "model.onnx").has_trees
