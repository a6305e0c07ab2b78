"""Games over feature groups for the groups benchmark, and the same games as shap sees them.

A game is one explained row x (elements,), its reference rows (a named baseline: one row; or
background rows), the groups (players) and the model function, through the service's own ONNX
adapter. v(S) = mean over reference rows b of f(x on the groups in S, b elsewhere); elements in
no group (text padding) always keep x's values.

shap gets exactly that game through a coding of the players: a row of d codes where -1 means
"this group from x" and b >= 0 means "this group from reference row b". The explained row is
all -1, shap's background is the reference rows' codes (row b all b), and shap's maskers then
build v(S) themselves, so both libraries call the same model function on the same rows.

Oracles: exact Shapley values by enumerating every coalition through that coding (a code path
apart from the estimators'), or, past 16 groups, antithetic permutations with np.where
(benchmarks/_reference.py); exact Owen values by the partition estimator's enumeration, which
shap's Partition explainer reproduces once it has expanded the whole tree (checked in the
section and in tests/test_bench_groups.py).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from benchmarks._models import CACHE, MODELS, relu_mlp
from benchmarks._reference import _cached, _single_reference
from explainers.base import Array, Background, Budget, Evaluator, ModelFn
from explainers.groups import Groups, Hierarchy, grid, tokens
from explainers.shapley.exact import all_coalitions, shapley_from_values
from explainers.shapley.partition import PartitionOwen
from service.models.onnx_model import OnnxModel

CODE_BLOCK = 4096  # coded rows decoded and evaluated per model call (oracles)


@dataclass(frozen=True)
class Model:
    """A model through the service's adapter: one output column, identity scale."""

    onnx: OnnxModel
    output: str
    column: int

    def fn(self) -> ModelFn:
        """(rows, elements) -> (rows, 1), as the data plane's target function computes it."""
        model, output, column = self.onnx, self.output, [self.column]

        def f(X: Array) -> Array:
            return model.predict(X, output)[:, column]
        return f

    def evaluator(self) -> Evaluator:
        """A fresh counted evaluator seeded with the throughput measured at load."""
        return Evaluator(self.fn(), self.onnx.chunk_rows, self.onnx.rows_per_second,
                         dtype=self.onnx.batch_dtype, path_major=self.onnx.has_trees)


@dataclass(frozen=True)
class Game:
    """One explained row over its groups against its reference rows."""

    model: Model
    x: Array  # (elements,)
    refs: Background  # reference rows (rows, elements) and f on them
    groups: Groups

    @property
    def d(self) -> int:
        return self.groups.size

    def decode(self, codes: Array) -> Array:
        """Coded players (n, d) -> model rows (n, elements): -1 = x, b = reference row b."""
        index = self.groups.index  # (elements,)
        src = np.where(index >= 0, codes[:, np.maximum(index, 0)], -1).astype(np.int64)
        ref = self.refs.data[np.maximum(src, 0), np.arange(index.size)]  # (n, elements)
        return np.where(src < 0, self.x, ref)

    def coded(self) -> tuple[Callable[[Array], Array], Array, Array]:
        """The game for shap: f over coded rows (n, d) -> (n,), the explained row's codes
        (d,) and the background's codes (reference rows, d)."""
        f = self.model.fn()

        def f_codes(codes: Array) -> Array:
            return np.asarray(f(self.decode(np.asarray(codes)))[:, 0])
        background = np.repeat(np.arange(self.refs.rows, dtype=np.float64)[:, None], self.d, 1)
        return f_codes, np.full(self.d, -1.0), background

    def values(self, masks: Array) -> Array:
        """v(S) for coalitions (n, d) bool through the coding: mean over the reference rows."""
        f, m = self.model.fn(), self.refs.rows
        out = []
        for start in range(0, masks.shape[0], max(1, CODE_BLOCK // m)):
            block = masks[start:start + max(1, CODE_BLOCK // m)]  # (c, d)
            codes = np.where(block[:, None, :], -1, np.arange(m)[None, :, None])  # (c, m, d)
            y = f(self.decode(codes.reshape(-1, self.d)))[:, 0].reshape(len(block), m)
            out.append(y @ self.refs.weights)
        return np.concatenate(out)  # (n,)


# --- oracles ----------------------------------------------------------------------------------
def exact_shapley(game: Game) -> Array:
    """Exact Shapley values (d,) over every coalition through the coding, cached on disk."""
    def compute() -> Array:
        v = game.values(all_coalitions(game.d))  # (2^d,) by bit code
        return shapley_from_values(v[:, None])[0]
    return _cached(_game_key(game, "exact"), compute)


def sampled_shapley(game: Game, pairs: int) -> Array:
    """Shapley values (d,) of a one-reference game past 16 groups: `pairs` antithetic pairs of
    the indicator game (players from x = 1, from the reference = 0), cached on disk."""
    assert game.refs.rows == 1, "sampled references are for one reference row"

    def indicator(masks: Array) -> Array:  # (n, d) 0/1 -> (n, 1)
        rows = np.where(game.groups.expand(masks > 0.5), game.x, game.refs.data[0])
        return game.model.fn()(rows)

    def compute() -> Array:
        rng = np.random.default_rng(2027)
        fz = float(game.refs.predictions[0, 0])
        return _single_reference(indicator, np.ones(game.d), np.zeros(game.d), fz, pairs, rng)[0]
    return _cached(_game_key(game, "pairs", pairs), compute)


def exact_owen(game: Game) -> Array:
    """Exact Owen values (d,) over the game's hierarchy: the partition estimator's enumeration
    with no limit (checked against shap's fully expanded Partition explainer)."""
    e = PartitionOwen().explain(game.model.evaluator(), game.x, game.refs, Budget(np.inf),
                                np.random.default_rng(0), game.groups)
    assert e.samples == 0, "the enumeration must have run"
    return np.asarray(e.values[0])


def _game_key(game: Game, *extra: object) -> str:
    h = hashlib.sha256()
    for a in (game.x, game.refs.data, game.groups.index):
        h.update(np.ascontiguousarray(a).tobytes())
    return "|".join(["groups", game.model.onnx.sha256, game.model.output,
                     str(game.model.column), h.hexdigest(), *map(str, extra)])


# --- hierarchies ------------------------------------------------------------------------------
def kd_tree(counts: tuple[int, ...]) -> Hierarchy:
    """A binary hierarchy over a row-major grid of cells: each block is cut in two along its
    longest axis (the first on ties), down to single cells. Binary, so shap's Partition
    explainer can use it too."""
    ids = np.arange(int(np.prod(counts))).reshape(counts)
    children: list[tuple[int, int]] = []

    def split(block: Array) -> int:
        if block.size == 1:
            return int(block.ravel()[0])
        axis = int(np.argmax(block.shape))
        half = block.shape[axis] // 2
        a, b = np.split(block, [half], axis=axis)
        pair = (split(a), split(b))
        children.append(pair)
        return ids.size + len(children) - 1

    split(ids)
    return Hierarchy.build(ids.size, children)


def linkage(h: Hierarchy) -> Array:
    """h as a scipy linkage matrix (internal nodes, 4): children, a positive height (shap stops
    at negative ones) and the leaf count, the layout shap's Partition masker takes."""
    out = np.zeros((len(h.children), 4))
    for k, kids in enumerate(h.children):
        assert len(kids) == 2, "shap's Partition explainer takes binary trees only"
        node = h.leaves + k
        out[k] = [kids[0], kids[1], 1.0 + k, len(h.members(node))]
    return out


# --- the benchmark's games --------------------------------------------------------------------
def loaded(name: str, probe: Array) -> OnnxModel:
    """A bundled model through the service's adapter, its batch size measured on `probe`."""
    model = OnnxModel(MODELS / name / "1" / "model.onnx")
    model.measure(probe, model.main_output())
    return model


def digits_games(rows: int, cells: int, binary: bool = False) -> list[Game]:
    """Digits from the bundled background (rows 0, 1, ...), each explained for its predicted
    class against zeros (the model's default baseline), over a cells x cells grid of patches
    (a k-d tree over them when `binary`)."""
    bg = np.load(MODELS / "digits_cnn" / "background.npy").reshape(100, 64).astype(np.float64)
    model = loaded("digits_cnn", bg)
    index, labels, counts = grid((1, 8, 8), (1, 2), (cells, cells))
    groups = Groups.build(index, labels, kd_tree(counts) if binary else None)
    zero = np.zeros((1, 64))
    out = []
    for x in bg[:rows]:
        cls = int(np.argmax(model.predict(x[None], model.main_output())[0]))
        m = Model(model, model.main_output(), cls)
        out.append(Game(m, x, Background.build(zero, m.fn()(zero)), groups))
    return out


def text_games(rows: int, binary: bool = False) -> list[Game]:
    """The longest sentences of the bundled text background, class "positive", against the
    mask token (the model's default), one group per non-pad token (contiguous halves when
    `binary`)."""
    bg = np.load(MODELS / "text_sentiment" / "background.npy").astype(np.float64)  # (32, 16)
    model = loaded("text_sentiment", bg)
    m = Model(model, model.main_output(), 1)
    longest = np.argsort(-(bg != 0).sum(axis=1), kind="stable")[:rows]
    out = []
    for x in bg[longest]:
        index, labels = tokens(x, pad=0)
        h = kd_tree((len(labels),)) if binary else None
        ref = np.where(index >= 0, 1.0, x)[None]  # the mask token on every word
        out.append(Game(m, x, Background.build(ref, m.fn()(ref)), Groups.build(index, labels, h)))
    return out


NUMERIC, LEVELS = 6, (3, 4, 4, 5, 5, 6, 6, 8, 3, 5)  # 16 groups over 55 columns
HIDDEN, BACKGROUND_ROWS = 64, 100


def onehot_games(rows: int) -> list[Game]:
    """A synthetic table: 6 numeric columns and 10 one-hot categoricals (one group each: 16
    groups over 55 columns), a random 55-64-64-1 ReLU MLP on them, 100 background rows as the
    reference (the tabular default)."""
    path = CACHE / "models" / "onehot_mlp" / "model.onnx"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        onnx.save(relu_mlp([NUMERIC + sum(LEVELS), HIDDEN, HIDDEN, 1], "onehot_mlp"), path)
    bg = onehot_rows(BACKGROUND_ROWS, np.random.default_rng(0))
    model = OnnxModel(path)
    model.measure(bg, "y")
    m = Model(model, "y", 0)
    background = Background.build(bg, m.fn()(bg))
    groups = onehot_groups()
    return [Game(m, x, background, groups)
            for x in onehot_rows(rows, np.random.default_rng(1))]


def onehot_groups() -> Groups:
    """Each numeric column its own group, each categorical's block of columns one group."""
    index = list(range(NUMERIC))
    for k, n in enumerate(LEVELS):
        index += [NUMERIC + k] * n
    labels = [f"x{j}" for j in range(NUMERIC)] + [f"c{k}" for k in range(len(LEVELS))]
    return Groups.build(np.array(index), labels)


def onehot_rows(n: int, rng: np.random.Generator) -> Array:
    """(n, 55): standard normal numerics, then one 1 per categorical block."""
    parts = [rng.normal(size=(n, NUMERIC))]
    for levels in LEVELS:
        parts.append(np.eye(levels)[rng.integers(0, levels, n)])
    return np.asarray(np.concatenate(parts, axis=1).astype(np.float32), np.float64)
