"""The groups benchmark's machinery on tiny games (seconds): shap's coded game is Sidelight's
game, the oracles agree with the estimators and with shap, and each part of the section runs and
writes its table."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from benchmarks import _games, _lime, _reference, groups
from benchmarks._ladder import Curve
from explainers.base import Budget
from explainers.groups import Hierarchy
from explainers.masking import coalition_values
from explainers.registry import build_registry

TINY = groups.Config(image_rows=1, text_rows=1, table_rows=1, ref_pairs=50, cap_s=0.01,
                     owen_cap_s=0.01, calls=2, sizes=(2,))


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """References are cached under a temporary directory, not the project's .bench-cache."""
    monkeypatch.setattr(_reference, "CACHE", tmp_path)
    yield


def test_the_coded_game_is_sidelights_game() -> None:
    """shap's coding (-1 = from x, b = from reference row b) gives the v(S) Sidelight's masking
    computes, on the table against 100 background rows and on a text with padding."""
    rng = np.random.default_rng(0)
    for game in (_games.onehot_games(1)[0], _games.text_games(1)[0]):
        masks = rng.random((20, game.d)) < 0.5
        ours = coalition_values(game.model.evaluator(), masks, game.x, game.refs,
                                game.groups)[:, 0]
        np.testing.assert_allclose(game.values(masks), ours, atol=1e-12)
        f, x, background = game.coded()
        assert f(x[None])[0] == pytest.approx(game.model.fn()(game.x[None])[0, 0], abs=1e-12)
        assert background.shape == (game.refs.rows, game.d)


def test_exact_references_equal_the_exact_estimator() -> None:
    game = _games.digits_games(1, 4)[0]  # 16 patches against zeros
    e = build_registry()["exact"].explain(game.model.evaluator(), game.x, game.refs,
                                          Budget(np.inf), np.random.default_rng(0), game.groups)
    np.testing.assert_allclose(_games.exact_shapley(game), e.values[0], atol=1e-12)


def test_sampled_references_approach_the_exact_values() -> None:
    game = _games.digits_games(1, 2)[0]  # 4 patches: exact is known
    exact = _games.exact_shapley(game)
    sampled = _games.sampled_shapley(game, 200)
    assert np.linalg.norm(sampled - exact) / np.linalg.norm(exact) < 0.02


def test_shap_partition_fully_expanded_equals_exact_owen() -> None:
    """The Owen reference (Sidelight's enumeration) is what shap's Partition explainer returns
    once its evaluations cover the whole binary tree, on 16 patches and on a sentence."""
    for game in (_games.digits_games(1, 4, binary=True)[0], _games.text_games(1, binary=True)[0]):
        case = groups.Case("c", [game], [_games.exact_owen(game)], "exact Owen")
        assert groups._shap_full(case) < 1e-9


def test_kd_tree_halves_the_longest_axis_and_maps_to_a_linkage() -> None:
    h = _games.kd_tree((2, 4))
    assert h.leaves == 8 and all(len(k) == 2 for k in h.children)
    assert h.members(h.kids(h.root)[0]) == (0, 1, 4, 5)  # the 4 columns cut first
    z = _games.linkage(h)
    assert z.shape == (7, 4) and z[-1, 3] == 8 and np.all(z[:, 2] > 0)
    with pytest.raises(AssertionError):
        _games.linkage(Hierarchy.flat(3))


def test_time_to_counts_exact_steps_and_stalled_errors() -> None:
    exact = Curve("Sidelight auto", lambda i, n, s: np.zeros(1), [1, 2, 4],
                  seconds=[0.001, 0.002, 0.004], errors=[0.2, 0.0, 0.0])
    assert groups._time_to(exact, 0.05) == (0.002, False)
    biased = Curve("shap", lambda i, n, s: np.zeros(1), [1, 2, 4, 8],
                   seconds=[0.001, 0.002, 0.004, 0.008], errors=[0.2, 0.15, 0.149, 0.148])
    assert groups._time_to(biased, 0.05)[0] == float("inf")
    assert groups._times(groups._ratio(float("inf"), 0.002)) == "shap never"


def test_every_part_runs_and_writes_its_table() -> None:
    score: groups.Score = []
    case = groups._case("digits CNN, 4 patches", _games.digits_games(1, 2), TINY)
    assert case.how == "exact (every coalition)" and case.d == "4"
    text = groups._time_to_accuracy([case], TINY, score)
    assert "| digits CNN, 4 patches | Sidelight auto |" in text
    assert "shap PermutationExplainer" in text and "shap PartitionExplainer" in text
    games = _games.digits_games(1, 2, binary=True)
    owen = groups._owen([groups.Case("digits, k-d tree", games,
                                     [_games.exact_owen(g) for g in games], "exact Owen")],
                        TINY, score)
    assert "| digits, k-d tree | Sidelight partition |" in owen
    adherence = groups._adherence(TINY, score)
    assert adherence.count("| 2/2 |") + adherence.count("| 1/2 |") == len(groups.SCENARIOS)
    assert {m.split(",")[0] for m, *_ in score} == {"1. speed-up at 5% vs better shap",
                                                    "2. Owen speed-up at 5% vs shap Partition",
                                                    "3. p99 wall / budget"}


def test_both_limes_approach_the_population_fit() -> None:
    """The lime package (its image explainer on the game's image view: segments, hide colour,
    a sentence's live tokens with pads kept) and Sidelight `lime` estimate the same population
    fit, which the reference enumerates: at 4,096 samples both are within a few percent of it on
    4 patches and on a sentence (a wrong segment, hide colour or pad would be off by far more)."""
    lime = build_registry()["lime"]
    for game in (_games.digits_games(1, 2)[0], _games.text_games(1)[0]):
        ref = _lime.population(game)
        theirs = _lime.package([game])(np.array(0), 4096, 0)
        ours = lime.explain(game.model.evaluator(), game.x, game.refs, Budget(np.inf, 4096),
                            np.random.default_rng(0), game.groups).values[0]
        for coef in (theirs, ours):
            assert np.linalg.norm(coef - ref) / np.linalg.norm(ref) < 0.08


def test_the_population_fit_recovers_an_affine_game() -> None:
    """The reference's weighted least squares returns an affine game's slopes exactly, over
    every on/off vector and over sampled ones."""
    for d in (4, 20):
        slopes = np.linspace(-1.0, 2.0, d)
        fit = _lime.population_fit(d, lambda z, s=slopes: 3.0 + z.astype(np.float64) @ s)
        np.testing.assert_allclose(fit, slopes, atol=1e-9)


def test_the_lime_section_writes_its_table() -> None:
    case = groups._case("digits CNN, 4 patches", _games.digits_games(1, 2), TINY)
    text = groups._lime_section(groups._lime_cases([case]), TINY)
    assert "| digits CNN, 4 patches | Sidelight lime |" in text
    assert "| digits CNN, 4 patches | lime LimeImageExplainer |" in text
    assert "| digits CNN, 4 patches | every on/off vector |" in text
