"""Fixed inputs for every kind of plot, and the reference images they are compared with.

The inputs are made here from a seeded generator (no server, no model), so a figure changes only
when the plotting code or matplotlib does. After an intended change, look at the new pictures
and rewrite the references with:

    python -m tests.plot_cases            # writes tests/data/plots/<kind>.png

References are stored at half resolution (2 x 2 pixel blocks averaged) to keep them small;
tests/test_plots.py compares at that resolution."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.image import imread, imsave

from service.client import plots
from service.client.explanation import Cost, Explanation, RowDetail
from service.client.results import (
    Activations,
    Attention,
    Embedding,
    Importance,
    PartialDependence,
    PartialDependence2D,
)

REFERENCES = Path(__file__).resolve().parent / "data" / "plots"
FEATURES = ("age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6")
WORDS = (("the", "acting", "was", "not", "great", "but", "the", "music", "was", "wonderful"),
         ("a", "really", "tedious", "film"))


def explanation(values: np.ndarray, se: np.ndarray, base: np.ndarray, *,
                names: tuple[str, ...], outputs: tuple[str, ...] = ("y",),
                inputs: dict[str, np.ndarray] | None = None, modality: str = "tabular",
                maps: dict[str, np.ndarray] | None = None,
                labels: tuple[tuple[str, ...], ...] = (), method: str = "permutation",
                model: str = "example") -> Explanation:
    """An Explanation as a server would return it: values (rows, outputs, features), 95%
    intervals of +-1.96 se, predictions = base + sum."""
    rows = len(values)
    return Explanation(
        model=model, version="1", method=method, values=values, std_errors=se,
        ci_low=values - 1.96 * se, ci_high=values + 1.96 * se,
        base_values=np.broadcast_to(base, (rows, len(outputs))).copy(),
        predictions=base + values.sum(axis=2), feature_names=names, output_names=outputs,
        cost=Cost(1000, 12.5, 200.0, "request", False, True), inputs=inputs or {},
        maps=maps or {}, labels=labels, modality=modality,
        rows=tuple(RowDetail(method, 1000, True, False, 20, {}) for _ in range(rows)))


def tabular(rows: int) -> Explanation:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, len(FEATURES)))  # (rows, features)
    weights = np.linspace(12, -8, len(FEATURES))
    values = (X * weights + rng.normal(scale=1.5, size=X.shape))[:, None, :]
    se = np.abs(rng.normal(scale=0.8, size=values.shape)) + 0.2
    return explanation(values, se, np.array([150.0]), names=FEATURES, inputs={"input": X})


def digit() -> Explanation:
    """A ring on an 8 x 8 image, explained over a 4 x 4 grid of 2 x 2 patches."""
    yy, xx = np.mgrid[:8, :8]
    ring = np.exp(-((np.hypot(yy - 3.5, xx - 3.5) - 2.5) ** 2))[None, None]  # (1, 1, 8, 8)
    patch = np.linspace(-0.2, 0.35, 16).reshape(4, 4) * np.array([[1, -1, 1, 1]] * 4)
    values = patch.reshape(1, 1, 16)
    image_map = np.kron(patch, np.ones((2, 2)))[None, None, None]  # (1, 1, 1, 8, 8)
    names = tuple(f"patch {r},{c}" for r in range(4) for c in range(4))
    return explanation(values, np.full(values.shape, 0.02), np.array([0.1]), names=names,
                       outputs=("0",), inputs={"image": ring}, modality="image",
                       maps={"image": image_map}, method="partition")


def text() -> Explanation:
    width = 16
    scores = [[0.05, 0.0, -0.01, -0.3, 0.03, 0.0, -0.01, 0.02, 0.01, 0.25],
              [0.0, 0.0, -0.37, 0.03]]
    values = np.zeros((2, 1, width))
    for r, s in enumerate(scores):
        values[r, 0, :len(s)] = s
    labels = tuple(tuple(w) + ("",) * (width - len(w)) for w in WORDS)
    return explanation(values, np.abs(values) * 0.1, np.array([0.3]),
                       names=tuple(f"tokens[{k}]" for k in range(width)),
                       outputs=("positive",), modality="text", labels=labels)


def permutation_importance() -> Importance:
    values = np.array([0.21, 0.02, 0.15, 0.08, 0.01, 0.0, 0.05, 0.03, 0.12, 0.04])
    return Importance(FEATURES, values, values * 0.15 + 0.005, metric="R^2 drop")


def pdp() -> PartialDependence:
    grid = np.linspace(-2, 2, 25)
    offsets = np.random.default_rng(1).normal(size=(30, 1))
    ice = np.tanh(grid)[None] * (1 + 0.3 * offsets) + offsets  # (rows, points)
    return PartialDependence("bmi", grid, ice.mean(axis=0), ice.std(axis=0) / np.sqrt(30), ice,
                             output="progression")


def pdp_2d(classes: bool) -> PartialDependence2D:
    gx, gy = np.linspace(-2, 2, 30), np.linspace(-1, 1, 20)
    x, y = np.meshgrid(gx, gy, indexing="ij")
    if not classes:
        return PartialDependence2D(("bmi", "bp"), gx, gy, np.sin(x) + y ** 2, output="y")
    scores = np.stack([-x, x - y, y + 0.5 * x], axis=2)  # (nx, ny, classes)
    rng = np.random.default_rng(2)
    points = np.column_stack([rng.uniform(-2, 2, 40), rng.uniform(-1, 1, 40)])
    kinds = np.argmax(np.stack([-points[:, 0], points[:, 0] - points[:, 1],
                                points[:, 1] + 0.5 * points[:, 0]], axis=1), axis=1)
    return PartialDependence2D(("petal length", "petal width"), gx, gy, scores,
                               class_names=("setosa", "versicolor", "virginica"),
                               points=points, point_classes=kinds)


def activations() -> Activations:
    yy, xx = np.mgrid[:6, :6]
    maps = np.stack([np.cos(k * xx / 3) * np.sin((6 - k) * yy / 4) for k in range(6)])
    return Activations("conv1", maps)


def attention() -> Attention:
    tokens = ("not", "bad", "at", "all")
    distance = np.subtract.outer(np.arange(4.0), np.arange(4.0)) ** 2  # (query, key)
    logits = -distance[None] * np.array([2.0, 0.2])[:, None, None]  # (heads, query, key)
    weights = np.exp(logits) / np.exp(logits).sum(axis=2, keepdims=True)
    return Attention("layer 0", tokens, weights)


def embedding() -> Embedding:
    rng = np.random.default_rng(3)
    centres = np.array([[2, 0, 0, 1], [-2, 1, 0, 0], [0, -2, 1, 0]], float)
    kinds = rng.integers(0, 3, 60)
    points = centres[kinds] + rng.normal(scale=0.5, size=(60, 4))
    names = ("negative", "neutral", "positive")
    return Embedding("sentence", points, tuple(names[k] for k in kinds),
                     labels=tuple(f"s{k}" for k in range(60)))


CASES: dict[str, Callable[[], Figure]] = {
    "bar": lambda: plots.bar(tabular(1)),
    "waterfall": lambda: plots.waterfall(tabular(1), max_features=6),
    "beeswarm": lambda: plots.beeswarm(tabular(60)),
    "mean_attribution": lambda: plots.mean_attribution(tabular(60)),
    "permutation_importance": lambda: plots.importance(permutation_importance()),
    "pdp": lambda: plots.partial_dependence(pdp()),
    "pdp_2d": lambda: plots.partial_dependence_2d(pdp_2d(classes=False)),
    "decision_regions": lambda: plots.partial_dependence_2d(pdp_2d(classes=True)),
    "image": lambda: plots.image(digit()),
    "text": lambda: plots.text(text(), [0, 1]),
    "activations": lambda: plots.activations(activations()),
    "attention": lambda: plots.attention(attention()),
    "embedding": lambda: plots.embedding(embedding()),
}


def half(png: bytes) -> np.ndarray:
    """A PNG's RGB pixels in [0, 1], 2 x 2 blocks averaged: (H/2, W/2, 3)."""
    rgb = imread(io.BytesIO(png), format="png")[..., :3]
    h, w = rgb.shape[0] // 2 * 2, rgb.shape[1] // 2 * 2
    return rgb[:h, :w].reshape(h // 2, 2, w // 2, 2, 3).mean(axis=(1, 3))  # type: ignore[no-any-return]


def write_references() -> None:
    REFERENCES.mkdir(parents=True, exist_ok=True)
    for name, make in CASES.items():
        imsave(REFERENCES / f"{name}.png", half(plots.png(make())), format="png",
               metadata={"Software": None})
        print(REFERENCES / f"{name}.png")


if __name__ == "__main__":
    write_references()
