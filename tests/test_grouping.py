"""Modality inference, default groups per modality, client masks and baselines (no server)."""

from __future__ import annotations

import numpy as np
import pytest

from explainers.errors import InvalidArgument
from service.models.inputs import Layout, Modality, TensorInfo, infer_modality
from service.plane.baselines import BaselineSpec, baseline_rows, blur, check_baseline
from service.plane.grouping import (
    GroupRequest,
    cells_for,
    column_groups,
    halves,
    image_groups,
    mask_groups,
    token_groups,
)

IMAGE = TensorInfo("image", "FP32", (-1, 1, 8, 8))
TOKENS = TensorInfo("tokens", "INT64", (-1, -1))
TABLE = TensorInfo("x", "FP32", (-1, 5))


def test_modality_is_read_off_the_inputs() -> None:
    assert infer_modality([IMAGE], frozenset()) == Modality("image", 0, "NCHW")
    assert infer_modality([TensorInfo("i", "FP32", (-1, 32, 32, 3))], frozenset()).layout == "NHWC"
    assert infer_modality([TABLE, TOKENS], frozenset({"tokens"})) == Modality("text", 1)
    assert infer_modality([TOKENS], frozenset()).kind == "tabular"  # ints not indexing: numbers
    assert infer_modality([IMAGE], frozenset(), configured="tabular").kind == "tabular"
    with pytest.raises(InvalidArgument, match="modality"):
        infer_modality([IMAGE], frozenset(), configured="audio")


def test_layout_resolves_symbolic_dims_and_round_trips() -> None:
    layout = Layout.resolve([TABLE, TOKENS], [(5,), (7,)])
    assert layout.offsets == (0, 5, 12)
    X = np.arange(24.0).reshape(2, 12)
    feeds = layout.feeds(X)
    assert feeds["tokens"].dtype == np.int64 and feeds["tokens"].shape == (2, 7)
    np.testing.assert_array_equal(layout.flatten([feeds["x"], feeds["tokens"]]), X)
    with pytest.raises(InvalidArgument, match=r"inputs\[0\].shape"):
        Layout.resolve([TABLE], [(6,)])


def test_one_hot_blocks_become_one_group_each_in_column_order() -> None:
    names = ["age", "red", "green", "blue", "income"]
    g = column_groups(names, [("colour", ["red", "green", "blue"])])
    assert g.labels == ("age", "colour", "income")
    np.testing.assert_array_equal(g.index, [0, 1, 1, 1, 2])
    with pytest.raises(InvalidArgument, match="two blocks"):
        column_groups(names, [("a", ["red"]), ("b", ["red"])])
    with pytest.raises(InvalidArgument, match="unknown feature"):
        column_groups(names, [("a", ["purple"])])


def test_image_grid_follows_the_budget_and_the_config() -> None:
    layout = Layout.resolve([IMAGE], [(1, 8, 8)])
    modality = Modality("image", 0, "NCHW")
    assert cells_for(layout, modality, fits=lambda d: d <= 16) == (4, 4)
    assert cells_for(layout, modality, fits=lambda d: d <= 64) == (8, 8)
    assert cells_for(layout, modality, patch=(2,)) == (4, 4)
    assert cells_for(layout, modality, cells=(2, 4)) == (2, 4)
    groups, what = image_groups(layout, modality, (4, 4))
    assert groups.size == 16 and what.startswith("4 x 4 grid of 2 x 2-pixel patches")
    assert groups.hierarchy is not None and groups.hierarchy.kids(groups.hierarchy.root)
    with pytest.raises(InvalidArgument, match=r"groups\.grid"):
        cells_for(layout, modality, cells=(9,))


def test_tokens_are_players_and_padding_is_not() -> None:
    layout = Layout.resolve([TOKENS], [(6,)])
    row = np.array([4.0, 7, 9, 0, 0, 0])
    groups, _ = token_groups(layout, Modality("text", 0), row, pad=0,
                             vocabulary=["<pad>", "<mask>", "", "", "good", "", "", "not"])
    assert groups.labels == ("good @0", "not @1", "9 @2")
    np.testing.assert_array_equal(groups.index, [0, 1, 2, -1, -1, -1])
    assert groups.hierarchy is not None and groups.hierarchy.leaves == 3
    with pytest.raises(InvalidArgument, match="every position is padding"):
        token_groups(layout, Modality("text", 0), np.zeros(6), pad=0)


def test_a_client_mask_is_used_as_given() -> None:
    layout = Layout.resolve([TABLE, IMAGE], [(5,), (1, 8, 8)])
    mask = np.zeros((1, 8, 8), np.int64)
    mask[:, 4:] = 1
    groups, what = mask_groups(layout, GroupRequest(mask=mask, input="image",
                                                    labels=("top", "bottom")))
    assert groups.labels == ("top", "bottom") and "request mask (2 groups)" in what
    np.testing.assert_array_equal(groups.index[:5], -1)  # the table input is not a player
    np.testing.assert_array_equal(groups.index[5:].reshape(8, 8)[4:], 1)
    with pytest.raises(InvalidArgument, match=r"groups.mask.shape"):
        mask_groups(layout, GroupRequest(mask=np.zeros((7, 7), np.int64), input="image"))
    with pytest.raises(InvalidArgument, match="group ids"):
        mask_groups(layout, GroupRequest(mask=np.full((1, 8, 8), 0.5), input="image"))
    with pytest.raises(InvalidArgument, match="id 1 has no element"):
        mask_groups(layout, GroupRequest(mask=mask * 2, input="image"))


def test_halves_split_spans() -> None:
    h = halves(5)
    assert h.members(h.root) == (0, 1, 2, 3, 4)
    assert sorted(len(h.members(k)) for k in h.kids(h.root)) == [2, 3]


def test_baselines() -> None:
    layout = Layout.resolve([IMAGE], [(1, 8, 8)])
    modality = Modality("image", 0, "NCHW")
    x = np.random.default_rng(0).random(64)
    bg = np.random.default_rng(1).random((10, 64))
    assert np.all(baseline_rows(BaselineSpec("zeros"), x, layout, modality, None) == 0)
    np.testing.assert_allclose(baseline_rows(BaselineSpec("mean"), x, layout, modality, bg)[0],
                               bg.mean(axis=0))
    blurred = baseline_rows(BaselineSpec("blur", sigma=1.0), x, layout, modality, None)[0]
    assert blurred.std() < x.std() and blurred.mean() == pytest.approx(x.mean(), rel=0.05)
    np.testing.assert_allclose(blur(np.ones((1, 4, 4)), (1, 2), 3.0), 1.0)  # flat stays flat
    with pytest.raises(InvalidArgument, match="mask needs a text model"):
        check_baseline(BaselineSpec("mask"), modality)
    with pytest.raises(InvalidArgument, match=r"baseline\.kind"):
        check_baseline(BaselineSpec("noise"), modality)
