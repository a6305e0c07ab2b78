"""LIME on the groups benchmark's games: the lime package's image explainer on the very game
Sidelight's `lime` explains, and the population coefficients both estimate.

The lime package (LimeImageExplainer, its defaults: kernel width 0.25 on the cosine distance,
segments kept with probability 1/2, Ridge(alpha=1)) sees a game as an image: the explained
elements as pixels, the groups as its segments, the baseline as its hide colour, and a
classifier function that writes the pixels back into the model's row (text: the live tokens as
a 1 x L image, pads kept). Both libraries then sample the same distribution of on/off vectors
with the same weights, so both estimate the same population fit: min over (a, b) of
E_z[k(z) (v(z) - a - b.z)^2], z uniform on {0, 1}^d, computed here by enumerating every z up to
16 groups, else from POPULATION_SAMPLES uniform draws (a code path apart from both libraries).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable

import numpy as np

from benchmarks._games import Game, _game_key
from benchmarks._reference import _cached
from explainers.base import Array
from explainers.perturbation.lime import kernel_weights
from explainers.shapley.exact import all_coalitions

POPULATION_SAMPLES = 2**20  # past 16 groups (its own error: 1/16 of that of 4,096 samples)
BLOCK = 2**14  # coalitions per model pass of the reference


def population(game: Game) -> Array:
    """The population LIME coefficients (d,) of the game, cached on disk."""
    return _cached(_game_key(game, "lime-population", POPULATION_SAMPLES),
                   lambda: population_fit(game.d, game.values))


def population_fit(d: int, values: Callable[[Array], Array]) -> Array:
    """The weighted least squares of v(z) (values: (n, d) bool -> (n,)) on z with an
    intercept, over every on/off vector up to 16 players, else POPULATION_SAMPLES uniform
    ones, folded in blocks: the coefficients (d,)."""
    exact = d <= 16
    n = 2**d if exact else POPULATION_SAMPLES
    rng = np.random.default_rng(2028)
    every = all_coalitions(d) if exact else None  # (2^d, d) bool
    A, b = np.zeros((d + 1, d + 1)), np.zeros(d + 1)
    for start in range(0, n, BLOCK):
        z = every[start:start + BLOCK] if every is not None else \
            rng.random((min(BLOCK, n - start), d)) < 0.5  # (block, d) bool
        Z = np.concatenate([np.ones((len(z), 1)), z], axis=1)  # (block, 1 + d)
        w = kernel_weights(z.astype(np.float64))  # (block,)
        A += Z.T @ (Z * w[:, None])
        b += Z.T @ (w * values(z))
    return np.asarray(np.linalg.solve(A, b)[1:])


def package(games: list[Game]) -> Callable[[Array, int, int], Array]:
    """Curve function (row index, samples, seed) -> the lime package's coefficients (d,): its
    image explainer with its defaults, the whole neighbourhood in one model call (its default
    batch of 10 images per call would only add to its time)."""
    os.environ.setdefault("TQDM_DISABLE", "1")  # lime draws a progress bar per explanation
    from lime import lime_image

    views = [_image_view(g) for g in games]

    def explain(i: Array, n: int, seed: int) -> Array:
        g, (image, segments, hide, classify) = games[int(i)], views[int(i)]
        explainer = lime_image.LimeImageExplainer(random_state=seed)
        e = explainer.explain_instance(image, classify, labels=(0,), hide_color=hide,
                                       top_labels=None, num_features=g.d, num_samples=n,
                                       batch_size=n, segmentation_fn=lambda _: segments)
        coef = np.zeros(g.d)
        for feature, value in e.local_exp[0]:
            coef[feature] = value
        return coef
    return explain


def _image_view(g: Game) -> tuple[Array, Array, float, Callable[[Array], Array]]:
    """The game as lime sees it: a 2-D grey image of the grouped elements, their segments
    (group ids), the baseline's value there (one value: lime's hide colour) and the classifier
    function on lime's RGB batches (n, H, W, 3) -> (n, 1)."""
    live = np.flatnonzero(g.groups.index >= 0)  # (L,) elements in a group
    hide = np.unique(g.refs.data[0, live])
    assert g.refs.rows == 1 and hide.size == 1, "lime's hide colour is one value"
    side = math.isqrt(live.size)
    shape = (side, side) if side * side == live.size and live.size == g.x.size else \
        (1, live.size)
    f, x = g.model.fn(), g.x

    def classify(images: Array) -> Array:
        rows = np.repeat(x[None], images.shape[0], axis=0)  # (n, elements)
        rows[:, live] = images[..., 0].reshape(images.shape[0], -1)
        return np.asarray(f(rows))
    return (x[live].reshape(shape), g.groups.index[live].reshape(shape), float(hide[0]),
            classify)
