"""Occlusion against a hand computation, LIME against an affine model and its own error bars."""

from __future__ import annotations

import numpy as np
import pytest

from explainers import Background, Budget, Evaluator
from explainers.base import Array
from explainers.errors import InvalidArgument, ResourceExhausted
from explainers.groups import Groups, grid
from explainers.perturbation.lime import Lime, kernel_weights
from explainers.perturbation.occlusion import Occlusion, Windows


def crafted(X: Array) -> Array:
    """4 x 4 'images': output = 2 * pixel(1, 1) + pixel(2, 3) * pixel(3, 3)."""
    img = X.reshape(-1, 4, 4)
    return np.stack([2 * img[:, 1, 1] + img[:, 2, 3] * img[:, 3, 3]], axis=1)


def evaluator(f=crafted) -> Evaluator:  # type: ignore[no-untyped-def]
    return Evaluator(f, 4096, 1e6)


def budget(seconds: float = 10.0, evals: int | None = None) -> Budget:
    return Budget.of_seconds(seconds, max_evaluations=evals)


def test_windows_cover_every_element_like_captum() -> None:
    w = Windows.build((4, 4), (3, 3), (2, 2))
    assert w.counts == (2, 2)  # ceil((4 - 3) / 2) + 1, the last window clipped at the edge
    masks = w.masks(0, w.count).reshape(4, 4, 4)
    assert masks[3, 2:, 2:].all() and masks[3].sum() == 4  # clipped to 2 x 2
    assert np.all(masks.sum(axis=0) >= 1)
    assert w.labels()[3] == "window 2,2"


def test_occlusion_equals_a_hand_computation() -> None:
    x = np.arange(1.0, 17.0)  # pixel (r, c) = 4r + c + 1
    baseline = Background.build(np.zeros((1, 16)), crafted(np.zeros((1, 16))))
    windows = Windows.build((4, 4), (2, 2), (2, 2))
    got = Occlusion(windows).explain(evaluator(), x, baseline, budget(),
                                     np.random.default_rng(0))
    fx = 2 * 6 + 12 * 16  # 204
    # windows at (0,0), (0,2), (2,0), (2,2): only (0,0) holds pixel (1,1), only (2,2) holds
    # pixels (2,3) and (3,3)
    np.testing.assert_allclose(got.values[0], [12, 0, 0, 192])
    heat = got.map.reshape(4, 4)  # type: ignore[union-attr]
    np.testing.assert_allclose(heat[:2, :2], 12)
    np.testing.assert_allclose(heat[2:, 2:], 192)
    assert got.prediction[0] == fx and not got.additive and np.all(got.std_errors == 0)


def test_overlapping_windows_average_their_drops() -> None:
    x = np.arange(1.0, 17.0)
    baseline = Background.build(np.zeros((1, 16)), crafted(np.zeros((1, 16))))
    windows = Windows.build((4, 4), (2, 2), (1, 1))  # 9 windows, pixel (1,1) in 4 of them
    got = Occlusion(windows).explain(evaluator(), x, baseline, budget(),
                                     np.random.default_rng(0))
    heat = got.map.reshape(4, 4)  # type: ignore[union-attr]
    # pixel (0,0) is covered by window (0,0) only, which holds (1,1): drop 12
    assert heat[0, 0] == pytest.approx(12)
    # pixel (1,1): 4 windows, all hold (1,1) and none holds (2,3)/(3,3) -> 12
    assert heat[1, 1] == pytest.approx(12)
    # pixel (2,2): windows (1,1) [holds (1,1): 12], (1,2), (2,1), (2,2) [holds (2,3), (3,3)...]
    drops = {(r, c): v for (r, c), v in zip(np.ndindex(3, 3), got.values[0], strict=True)}
    assert heat[2, 2] == pytest.approx(np.mean([drops[(1, 1)], drops[(1, 2)], drops[(2, 1)],
                                                drops[(2, 2)]]))


def test_occlusion_refuses_what_does_not_fit() -> None:
    x = np.zeros(16)
    bg = Background.build(np.zeros((1, 16)), crafted(np.zeros((1, 16))))
    with pytest.raises(ResourceExhausted, match="occlusion needs 10 model evaluations"):
        Occlusion(Windows.build((4, 4), (2, 2), (1, 1))).explain(
            evaluator(), x, bg, budget(evals=5), np.random.default_rng(0))
    with pytest.raises(InvalidArgument, match=r"strides in 1\.\.window"):
        Windows.build((4, 4), (2, 2), (3, 1))


def affine(X: Array) -> Array:
    w = np.linspace(-1, 1, X.shape[1])
    return np.stack([X @ w + 3.0, 2 * X @ w], axis=1)


def test_lime_on_an_affine_model_recovers_group_effects() -> None:
    """With a one-row baseline, f is linear in the on/off vector: the coefficients are each
    group's effect w . (x - b) over its elements, the intercept f(b), R^2 = 1."""
    rng = np.random.default_rng(0)
    x, b = rng.normal(size=36), rng.normal(size=36)
    index, labels, _ = grid((6, 6), (0, 1), (3, 3))
    groups = Groups.build(index, labels)
    got = Lime().explain(evaluator(affine), x, Background.build(b[None], affine(b[None])),
                         budget(evals=4000), np.random.default_rng(1), groups)
    w = np.linspace(-1, 1, 36)
    effect = np.array([(w * (x - b))[index == g].sum() for g in range(9)])
    np.testing.assert_allclose(got.values, np.stack([effect, 2 * effect]), rtol=1e-5)
    np.testing.assert_allclose(got.base_values, affine(b[None])[0], rtol=1e-5)
    assert dict(got.diagnostics)["surrogate_r2"] > 1 - 1e-9
    assert not got.additive and got.samples > 100


def test_lime_error_bars_cover_a_long_run_on_a_nonlinear_model() -> None:
    """The sandwich standard errors describe the sampling spread of the surrogate."""
    def f(X: Array) -> Array:
        return np.stack([np.tanh(X[:, :4].sum(axis=1)) * X[:, 5] + X[:, 2] ** 2], axis=1)

    rng = np.random.default_rng(2)
    x = rng.normal(size=8)
    bg = rng.normal(size=(50, 8))
    background = Background.build(bg, f(bg))
    long = Lime().explain(evaluator(f), x, background, budget(evals=400_000),
                          np.random.default_rng(0))
    hits = []
    for seed in range(20):
        short = Lime().explain(evaluator(f), x, background, budget(evals=2000),
                               np.random.default_rng(seed + 10))
        low, high = short.interval(0.95)
        hits.append((low <= long.values) & (long.values <= high))
    assert 0.85 <= np.mean(hits) <= 1.0
    assert dict(long.diagnostics)["surrogate_r2"] < 0.99  # a surrogate, and it says so


def test_lime_kernel_weights_match_limes_formula() -> None:
    z = np.array([[1, 1, 1, 1], [1, 0, 0, 0], [0, 0, 0, 0]], bool)
    d = 1 - np.sqrt(np.array([4, 1, 0]) / 4)
    np.testing.assert_allclose(kernel_weights(z), np.sqrt(np.exp(-d**2 / 0.25**2)))
