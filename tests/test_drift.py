"""Drift statistics against values computed independently: by hand, with numpy or with scipy."""

from __future__ import annotations

import itertools
import threading

import numpy as np
import pytest
from scipy import special, stats

from explainers.errors import InvalidArgument
from service.monitoring.drift import (
    PSI_EPSILON,
    AttributionWindow,
    Cached,
    DriftMonitor,
    DriftWindow,
    Reference,
    attribution_shift,
    binned_ks,
    mean_abs_attribution,
    population_stability_index,
    top_k_change,
)

Array = np.ndarray


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def discrete(values: list[float], counts: list[int], seed: int = 0) -> Array:
    """A shuffled column holding values[i] exactly counts[i] times, as (rows, 1)."""
    column = np.repeat(np.asarray(values, dtype=np.float64), counts)
    return rng(seed).permutation(column)[:, np.newaxis]


def hand_psi(p: Array, q: Array, eps: float = 1e-4) -> float:
    """PSI written out independently: clip both shares at eps, sum (p - q) ln(p / q)."""
    p, q = np.maximum(p, eps), np.maximum(q, eps)
    return float(sum((a - b) * np.log(a / b) for a, b in zip(p, q, strict=True)))


def explicit_counts(column: Array, edges: Array) -> Array:
    """Counts per right-closed bin (lo, hi] by explicit comparisons, one bin at a time."""
    return np.array([np.count_nonzero((column > lo) & (column <= hi))
                     for lo, hi in itertools.pairwise(edges)], dtype=np.float64)


# ----------------------------------------------------------------------------------- reference


def test_reference_edges_are_quantiles_with_infinite_outer_edges() -> None:
    X = rng().normal(size=(1000, 3))
    ref = Reference.build(X, bins=10)
    for j, edges in enumerate(ref.edges):
        levels = np.arange(1, 10) / 10
        expected = np.quantile(X[:, j], levels, method="inverted_cdf")
        assert edges[0] == -np.inf and edges[-1] == np.inf
        np.testing.assert_array_equal(edges[1:-1], expected)
    np.testing.assert_allclose(ref.proportions, 0.1)  # 1000 distinct values: 100 per bin
    np.testing.assert_allclose(ref.cdf, np.tile(np.arange(1, 11) / 10, (3, 1)))


def test_discrete_feature_gets_deduplicated_edges_and_padding() -> None:
    X = np.hstack([discrete([0, 1, 2], [30, 30, 40]), rng().normal(size=(100, 1))])
    ref = Reference.build(X, bins=10)
    np.testing.assert_array_equal(ref.edges[0], [-np.inf, 0, 1, 2, np.inf])
    assert ref.bins == 10 and ref.features == 2
    np.testing.assert_allclose(ref.proportions[0], [0.3, 0.3, 0.4] + [0.0] * 7)
    np.testing.assert_allclose(ref.cdf[0], [0.3, 0.6, 1.0] + [1.0] * 7)
    assert not ref.proportions.flags.writeable


def test_every_value_lands_in_a_bin_and_nan_is_not_counted() -> None:
    ref = Reference.build(rng().normal(size=(200, 2)))
    X = np.array([[-np.inf, np.inf], [1e300, -1e300], [0.0, np.nan], [np.nan, 5.0]])
    counts = ref.histogram(X)  # (features, bins)
    np.testing.assert_array_equal(counts.sum(axis=1), [3, 3])
    assert counts[0, 0] == 1 and counts[0, -1] == 1  # -inf first bin, +1e300 last
    assert counts[1, -1] == 2  # +inf and 5.0 in the last bin, (e, +inf]


def test_weighted_reference_equals_repeated_rows() -> None:
    X = rng(1).normal(size=(50, 2))
    weights = rng(2).integers(1, 5, size=50)
    weighted = Reference.build(X, bins=5, weights=weights.astype(np.float64))
    repeated = Reference.build(np.repeat(X, weights, axis=0), bins=5)
    for a, b in zip(weighted.edges, repeated.edges, strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(weighted.proportions, repeated.proportions)
    np.testing.assert_allclose(weighted.cdf, repeated.cdf)


def test_reference_ignores_nan_rows_per_feature() -> None:
    X = rng().normal(size=(40, 2))
    X[::3, 0] = np.nan
    X[1::4, 1] = np.nan
    ref = Reference.build(X, bins=4)
    for j in range(2):
        alone = Reference.build(X[~np.isnan(X[:, j]), j:j + 1], bins=4)  # the column without NaN
        np.testing.assert_array_equal(ref.edges[j], alone.edges[0])
        np.testing.assert_allclose(ref.proportions[j], alone.proportions[0])


# ------------------------------------------------------------------------------------------ PSI


def test_psi_function_matches_hand_formula() -> None:
    p = np.array([0.1, 0.5, 0.3, 0.1, 0.0])
    q = np.array([0.3, 0.3, 0.4, 0.0, 0.0])
    assert population_stability_index(p, q) == pytest.approx(hand_psi(p, q), rel=1e-12)
    assert population_stability_index(p, p) == 0.0


def test_psi_from_explicit_counts_end_to_end() -> None:
    ref = Reference.build(discrete([0, 1, 2], [30, 30, 40]))
    window = DriftWindow(ref, clock=FakeClock())
    window.observe(discrete([0, 1, 2, 3], [10, 50, 30, 10], seed=1))  # 3 is above the range
    np.testing.assert_array_equal(window.counts()[0, :4], [10, 50, 30, 10])
    p = np.array([10, 50, 30, 10]) / 100  # window counts per bin (-inf,0] (0,1] (1,2] (2,inf)
    q = np.array([30, 30, 40, 0]) / 100  # reference counts on the same bins
    assert window.stats().psi[0] == pytest.approx(hand_psi(p, q), rel=1e-12)


def test_identical_distribution_gives_zero_psi_and_ks() -> None:
    X = rng().normal(size=(5000, 4))
    window = DriftWindow(Reference.build(X), clock=FakeClock())
    window.observe(X)
    result = window.stats()
    np.testing.assert_allclose(result.psi, 0.0, atol=1e-12)
    np.testing.assert_allclose(result.ks, 0.0, atol=1e-12)
    fresh = DriftWindow(Reference.build(X), clock=FakeClock())
    fresh.observe(rng(1).normal(size=(5000, 4)))  # same distribution, new sample
    assert np.all(fresh.stats().psi < 0.02) and np.all(fresh.stats().ks < 0.05)


def test_shifted_distribution_gives_large_psi() -> None:
    X = rng().normal(size=(5000, 3))
    window = DriftWindow(Reference.build(X), clock=FakeClock())
    window.observe(rng(1).normal(size=(5000, 3)) + np.array([0.0, 1.0, 2.0]))
    result = window.stats()
    assert result.psi[0] < 0.02
    assert result.psi[1] > 0.5 and result.psi[2] > 2.0  # 0.25 is the usual "major shift" line
    assert result.ks[1] > 0.3 and result.ks[2] > 0.6


def test_psi_is_the_symmetrised_kl_divergence_of_scipy() -> None:
    g = rng(7)
    for _ in range(20):
        p, q = g.dirichlet(np.ones(8)), g.dirichlet(np.ones(8))
        p, q = (p + 1e-3) / (p + 1e-3).sum(), (q + 1e-3) / (q + 1e-3).sum()  # no clipping
        expected = stats.entropy(p, q) + stats.entropy(q, p)  # KL(p||q) + KL(q||p)
        assert population_stability_index(p, q) == pytest.approx(expected, rel=1e-10)


def test_window_psi_matches_scipy_binning_and_divergence() -> None:
    g = rng(8)
    reference, observed = g.gamma(2.0, size=(2000, 2)), g.gamma(2.5, size=(700, 2)) * 1.1
    window = DriftWindow(Reference.build(reference, bins=10), clock=FakeClock())
    window.observe(observed)
    def right_closed_counts(x: Array, edges: Array) -> Array:
        """Counts in (a, b] with scipy's [a, b) bins: x in (a, b] iff -x in [-b, -a)."""
        bins = -np.concatenate(([-1e9], edges[1:-1], [1e9]))[::-1]
        return np.asarray(stats.binned_statistic(-x, None, "count", bins=bins).statistic[::-1])

    for j, edges in enumerate(window.reference.edges):  # reference values sit on the edges
        p = right_closed_counts(observed[:, j], edges)
        q = right_closed_counts(reference[:, j], edges)
        p, q = np.maximum(p / p.sum(), PSI_EPSILON), np.maximum(q / q.sum(), PSI_EPSILON)
        expected = np.sum(special.rel_entr(p, q) + special.rel_entr(q, p))
        assert window.stats().psi[j] == pytest.approx(expected, rel=1e-10)


# ------------------------------------------------------------------------------------------- KS


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binned_ks_equals_scipy_when_values_sit_on_edges(seed: int) -> None:
    values = np.array([-1.5, 0.0, 2.0, 3.25, 7.0])
    g = rng(seed)
    reference = g.choice(values, size=400, p=[0.2, 0.15, 0.25, 0.2, 0.2])
    observed = g.choice(values, size=150, p=[0.05, 0.35, 0.1, 0.3, 0.2])
    ref = Reference.build(reference[:, np.newaxis])
    assert np.all(np.isin(values, ref.edges[0]))  # the premise: every value is an edge
    window = DriftWindow(ref, clock=FakeClock())
    window.observe(observed[:, np.newaxis])
    exact = stats.ks_2samp(observed, reference).statistic
    assert window.stats().ks[0] == pytest.approx(exact, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_binned_ks_is_a_lower_bound_of_scipy_otherwise(seed: int) -> None:
    g = rng(seed)
    reference = g.normal(size=(800, 3))
    observed = g.normal(size=(300, 3)) * np.array([1.0, 1.5, 0.7]) + np.array([0.3, 0.0, -0.2])
    window = DriftWindow(Reference.build(reference, bins=10), clock=FakeClock())
    window.observe(observed)
    binned = window.stats().ks
    exact = [stats.ks_2samp(observed[:, j], reference[:, j]).statistic for j in range(3)]
    assert np.all(binned <= np.array(exact) + 1e-12)
    assert np.all(binned > 0)


def test_binned_ks_function_is_the_largest_cdf_gap() -> None:
    a = np.array([[0.1, 0.5, 1.0], [0.2, 0.4, 1.0]])
    b = np.array([[0.3, 0.4, 1.0], [0.2, 0.9, 1.0]])
    np.testing.assert_allclose(binned_ks(a, b), [0.2, 0.5])


# -------------------------------------------------------------------- empty and single values


def test_empty_window_gives_nan_not_zero() -> None:
    window = DriftWindow(Reference.build(rng().normal(size=(100, 2))), clock=FakeClock())
    result = window.stats()
    assert np.all(np.isnan(result.psi)) and np.all(np.isnan(result.ks))
    np.testing.assert_array_equal(result.observations, [0, 0])
    window.observe(np.empty((0, 2)))
    assert np.all(np.isnan(window.stats().psi))


def test_all_nan_feature_in_window_is_nan_for_that_feature_only() -> None:
    window = DriftWindow(Reference.build(rng().normal(size=(100, 2))), clock=FakeClock())
    window.observe(np.array([[0.1, np.nan], [0.2, np.nan]]))
    result = window.stats()
    assert np.isfinite(result.psi[0]) and np.isnan(result.psi[1]) and np.isnan(result.ks[1])


def test_single_value_reference_and_window() -> None:
    ref = Reference.build(np.array([[2.0, -1.0]]))
    np.testing.assert_array_equal(ref.edges[0], [-np.inf, 2.0, np.inf])
    same = DriftWindow(ref, clock=FakeClock())
    same.observe(np.array([2.0, -1.0]))  # one row given as (features,)
    np.testing.assert_array_equal(same.stats().psi, [0.0, 0.0])
    np.testing.assert_array_equal(same.stats().ks, [0.0, 0.0])
    moved = DriftWindow(ref, clock=FakeClock())
    moved.observe(np.array([[3.0, -1.0]]))
    p, q = np.array([0.0, 1.0]), np.array([1.0, 0.0])
    assert moved.stats().psi[0] == pytest.approx(hand_psi(p, q), rel=1e-12)
    assert moved.stats().ks[0] == pytest.approx(stats.ks_2samp([3.0], [2.0]).statistic)


# ------------------------------------------------------------------------------------- expiry


def test_old_slices_expire_with_the_clock() -> None:
    clock = FakeClock(1000.0)
    window = DriftWindow(Reference.build(rng().normal(size=(100, 1))), 300.0, 5.0, clock)
    window.observe(np.zeros((3, 1)))
    clock.advance(200)
    window.observe(np.zeros((4, 1)))
    assert window.stats().observations[0] == 7
    clock.advance(99)  # 299 s after the first slice started: still inside
    assert window.stats().observations[0] == 7
    clock.advance(1)  # 300 s: the first slice has left the window
    assert window.stats().observations[0] == 4
    window.observe(np.zeros((2, 1)))  # reuses the first slice's ring slot
    assert window.stats().observations[0] == 6
    clock.advance(1000)
    assert np.isnan(window.stats().psi[0])


def test_ring_memory_is_bounded_by_slices() -> None:
    clock = FakeClock(0.0)
    window = DriftWindow(Reference.build(rng().normal(size=(100, 2))), 10.0, 3.0, clock)
    for _ in range(100):  # many full turns of the 4-slot ring
        window.observe(np.zeros((1, 2)))
        clock.advance(1.0)
    assert window._ring._data.shape == (4, 2, 10)  # ceil(10 / 3) slices
    assert window.stats().observations[0] <= 12


def test_window_rejects_bad_configuration_and_shapes() -> None:
    ref = Reference.build(rng().normal(size=(10, 2)))
    with pytest.raises(ValueError):
        DriftWindow(ref, window_seconds=5.0, slice_seconds=10.0)
    with pytest.raises(InvalidArgument):
        DriftWindow(ref).observe(np.zeros((3, 5)))
    with pytest.raises(InvalidArgument):
        Reference.build(np.zeros((0, 2)))
    with pytest.raises(InvalidArgument):
        Reference.build(np.zeros((4, 2)), weights=np.array([1.0, -1.0, 1.0, 1.0]))


# ------------------------------------------------------------------------------ vectorisation


def test_large_batch_counts_match_explicit_comparisons() -> None:
    g = rng(7)
    reference = g.normal(size=(2000, 30))
    reference[:, :5] = g.integers(0, 4, size=(2000, 5))  # a few discrete features
    window = DriftWindow(Reference.build(reference), clock=FakeClock())
    X = g.normal(size=(100_000, 30)) * 1.2
    window.observe(X)
    counts = window.counts()  # (features, bins)
    for j, edges in enumerate(window.reference.edges):
        np.testing.assert_array_equal(counts[j, :edges.size - 1], explicit_counts(X[:, j], edges))
        assert counts[j, edges.size - 1:].sum() == 0
    np.testing.assert_array_equal(window.stats().observations, 100_000)


def test_concurrent_observe_counts_every_row() -> None:
    window = DriftWindow(Reference.build(rng().normal(size=(100, 3))), clock=FakeClock())
    batches = [rng(i).normal(size=(50, 3)) for i in range(8)]

    def worker(batch: Array) -> None:
        for _ in range(100):
            window.observe(batch)

    threads = [threading.Thread(target=worker, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expected = sum(window.reference.histogram(b) for b in batches) * 100
    np.testing.assert_array_equal(window.counts(), expected)


# ----------------------------------------------------------------------------------- attributions


def test_attribution_ratio_on_a_hand_made_example() -> None:
    window = AttributionWindow(np.array([2.0, 1.0, 0.0, 0.5, 0.0]), clock=FakeClock())
    window.observe(np.array([[1.0, -1.0, 0.0, 0.5, 0.0],
                             [-3.0, 1.0, 0.0, -1.5, 2.0],
                             [np.nan, np.nan, np.nan, np.nan, np.nan]]))
    result = window.stats()
    np.testing.assert_allclose(result.mean_abs, [2.0, 1.0, 0.0, 1.0, 1.0])
    np.testing.assert_allclose(result.ratio, [1.0, 1.0, 1.0, 2.0, np.inf])  # 0/0 reads as 1
    np.testing.assert_array_equal(result.observations, [2, 2, 2, 2, 2])


def test_empty_attribution_window_is_nan() -> None:
    result = AttributionWindow(np.array([1.0, 2.0]), clock=FakeClock()).stats()
    assert np.all(np.isnan(result.mean_abs)) and np.all(np.isnan(result.ratio))
    assert np.isnan(result.rank_change) and np.all(np.isnan(result.shift))


@pytest.mark.parametrize(("reference", "window", "k", "expected"), [
    ([5, 4, 1, 0], [50, 40, 10, 0], 2, 0.0),  # same order, other scale
    ([5, 4, 1, 0], [5, 1, 4, 0], 2, 0.5),  # one of two seats changes hands
    ([5, 4, 1, 0], [0, 1, 4, 5], 2, 1.0),  # disjoint top-2
    ([5, 4, 1, 0], [0, 1, 4, 5], 4, 0.0),  # k = all features: nothing can change
    ([5, 4, 1, 0], [0, 1, 4, 5], 9, 0.0),  # k above the feature count is clamped
    ([3, 2, 2, 1], [3, 2, 2, 1], 2, 0.0),  # tie at the k-th value, same ties
    ([3, 2, 2, 1], [3, 2, 2.1, 1], 2, 0.25),  # tie broken: memberships .5/.5 -> 0/1
    ([4, 3, 2, 1], [1, 1, 1, 1], 2, 0.5),  # all tied: every feature holds half a seat
    ([3, 3, 0, 0], [0, 0, 3, 3], 1, 1.0),  # ties on both sides, no shared candidates
])
def test_top_k_change_on_hand_made_rankings(reference: list[float], window: list[float],
                                            k: int, expected: float) -> None:
    ref, win = np.array(reference, dtype=np.float64), np.array(window, dtype=np.float64)
    assert top_k_change(ref, win, k) == pytest.approx(expected)
    order = rng().permutation(ref.size)  # the score does not depend on feature order
    assert top_k_change(ref[order], win[order], k) == pytest.approx(expected)


def test_top_k_change_stays_in_unit_interval() -> None:
    g = rng(3)
    for _ in range(200):
        ref, win = g.integers(0, 4, size=8).astype(float), g.integers(0, 4, size=8).astype(float)
        assert 0.0 <= top_k_change(ref, win, int(g.integers(1, 9))) <= 1.0


def test_attribution_window_rank_change_and_reference_helper() -> None:
    phi_ref = np.array([[4.0, -3.0, 1.0, 0.0], [-4.0, 3.0, -1.0, 0.0]])
    reference = mean_abs_attribution(phi_ref)
    np.testing.assert_allclose(reference, [4.0, 3.0, 1.0, 0.0])
    window = AttributionWindow(reference, top_k=2, clock=FakeClock())
    window.observe(np.array([[4.0, 0.5, -2.0, 0.0]]))  # feature 2 overtakes feature 1
    assert window.stats().rank_change == pytest.approx(0.5)
    np.testing.assert_allclose(window.stats().ratio, [1.0, 0.5 / 3.0, 2.0, 1.0])


def test_attribution_drift_matches_an_independent_computation_on_random_windows() -> None:
    g = rng(11)
    reference_phi = g.normal(size=(200, 6)) * np.array([3.0, 2.0, 1.5, 1.0, 0.5, 0.1])
    window_phi = g.normal(size=(150, 6)) * np.array([0.5, 2.0, 1.5, 1.0, 3.0, 0.1])
    reference = np.abs(reference_phi).mean(axis=0)  # numpy, not the module's helper
    window = AttributionWindow(mean_abs_attribution(reference_phi), top_k=2, clock=FakeClock())
    window.observe(window_phi[:70])
    window.observe(window_phi[70:])
    result = window.stats()
    recent = stats.tmean(np.abs(window_phi), axis=0, limits=None)  # scipy's mean per feature
    np.testing.assert_allclose(result.mean_abs, recent, rtol=1e-12)
    np.testing.assert_allclose(result.ratio, recent / reference, rtol=1e-12)
    np.testing.assert_allclose(result.shift, (recent - reference) / reference.sum(), rtol=1e-12)
    top = lambda v: set(np.argsort(-v)[:2].tolist())  # noqa: E731 - brute-force top-2 sets
    assert result.rank_change == pytest.approx(1 - len(top(reference) & top(recent)) / 2)
    assert result.rank_change == pytest.approx(0.5)  # feature 4 replaced feature 0


def test_attribution_shift_on_a_hand_made_example_and_its_edge_cases() -> None:
    reference = np.array([2.0, 1.0, 1.0, 0.0])  # total 4
    shift = attribution_shift(reference, np.array([1.0, 1.0, 2.0, 0.4]))
    np.testing.assert_allclose(shift, [-0.25, 0.0, 0.25, 0.1])
    assert np.isnan(attribution_shift(reference, np.full(4, np.nan))).all()  # empty window
    zero = attribution_shift(np.zeros(2), np.array([0.0, 1.0]))
    assert zero[0] == 0.0 and zero[1] == np.inf


def test_single_row_attribution_window() -> None:
    window = AttributionWindow(np.array([1.0, 3.0]), top_k=1, clock=FakeClock())
    window.observe(np.array([-3.0, 1.0]))  # one row given as (features,)
    result = window.stats()
    np.testing.assert_allclose(result.ratio, [3.0, 1 / 3])
    np.testing.assert_allclose(result.shift, [0.5, -0.5])
    assert result.rank_change == 1.0
    np.testing.assert_array_equal(result.observations, [1, 1])


# ------------------------------------------------------------------------- cache and monitor


def test_cached_recomputes_only_after_the_interval() -> None:
    clock = FakeClock(0.0)
    calls: list[float] = []

    def compute() -> int:
        calls.append(clock())
        return len(calls)

    cached = Cached(compute, every_seconds=5.0, clock=clock)
    assert cached.get() == 1 and cached.get() == 1
    clock.advance(5.0)  # not more than 5 s yet
    assert cached.get() == 1
    clock.advance(0.01)
    assert cached.get() == 2 and calls == [0.0, 5.01]


def test_monitor_tracks_prediction_drift_and_caches_its_report() -> None:
    g = rng(5)
    background = g.normal(size=(1000, 3))
    weights = np.array([[1.0], [-2.0], [0.5]])

    def model(X: Array) -> Array:
        return np.asarray(X @ weights)  # (rows, 1)

    clock = FakeClock(0.0)
    monitor = DriftMonitor(Reference.build(background), Reference.build(model(background)),
                           mean_abs_attribution(background * weights.T), top_k=2, clock=clock)
    X = g.normal(size=(1000, 3)) + np.array([0.0, 1.5, 0.0])  # feature 1 shifts
    monitor.observe(X, model(X), X * weights.T)
    first = monitor.report()
    assert first.features.psi[1] > 1.0 and first.features.psi[0] < 0.05
    assert first.predictions is not None and first.predictions.psi[0] > 0.5
    assert first.attributions is not None and first.attributions.ratio[1] > 1.5
    monitor.observe(X, model(X), X * weights.T)
    assert monitor.report() is first  # cached
    clock.advance(5.5)
    assert monitor.report().features.observations[0] == 2000


def test_monitor_without_predictions_or_attributions() -> None:
    monitor = DriftMonitor(Reference.build(rng().normal(size=(50, 2))), clock=FakeClock())
    monitor.observe(np.zeros((2, 2)), predictions=np.zeros((2, 1)))
    report = monitor.report()
    assert report.predictions is None and report.attributions is None
    assert PSI_EPSILON == 1e-4


def test_monitor_bins_queued_rows_into_the_slice_they_arrived_in() -> None:
    clock = FakeClock(0.0)
    reference = rng().normal(size=(200, 2))
    monitor = DriftMonitor(Reference.build(reference), window_seconds=10.0, slice_seconds=5.0,
                           every_seconds=0.0, clock=clock, batch_rows=1000)
    early, late = rng(1).normal(size=(30, 2)), rng(2).normal(size=(20, 2)) + 3.0
    monitor.observe(early)
    assert monitor.features.counts().sum() == 0  # queued, not binned yet
    clock.advance(5.0)  # a new slice: the next observe bins the queued rows into slice 0
    monitor.observe(late)
    expected_early = monitor.features.reference.histogram(early)
    np.testing.assert_array_equal(monitor.features.counts(), expected_early)
    assert monitor.report().features.observations[0] == 50  # a report bins the rest
    clock.advance(5.0)  # slice 0 leaves the 10 s window, slice 1 stays
    np.testing.assert_array_equal(monitor.report().features.observations, [20, 20])
    np.testing.assert_array_equal(monitor.features.counts(),
                                  monitor.features.reference.histogram(late))


def test_monitor_bins_a_batch_once_it_holds_batch_rows() -> None:
    monitor = DriftMonitor(Reference.build(rng().normal(size=(50, 3))), clock=FakeClock(),
                           batch_rows=4)
    monitor.observe(np.zeros((3, 3)))
    monitor.observe(np.zeros((2, 3)))  # 3 < 4 queued: joins the batch
    assert monitor.features.counts().sum() == 0
    monitor.observe(np.zeros((1, 3)))  # 5 >= 4 queued: that batch is binned first
    np.testing.assert_array_equal(monitor.features.counts().sum(axis=1), [5, 5, 5])


def test_monitor_accepts_per_row_outputs_and_multi_output_attributions() -> None:
    g = rng(4)
    X = g.normal(size=(6, 3))
    phi = g.normal(size=(6, 2, 3))  # (rows, outputs, features)
    predictions = g.normal(size=(6, 2))
    monitor = DriftMonitor(Reference.build(g.normal(size=(100, 3))),
                           Reference.build(g.normal(size=(100, 2))), np.ones(3),
                           clock=FakeClock())
    monitor.observe(X[:4], list(predictions[:4]), list(phi[:4]))  # per-row sequences
    monitor.observe(X[4:], predictions[4:], list(phi[4:]))  # a (rows, outputs) matrix
    report = monitor.report()
    assert report.predictions is not None and report.attributions is not None
    np.testing.assert_array_equal(report.predictions.observations, [6, 6])
    np.testing.assert_allclose(report.attributions.mean_abs, np.abs(phi).mean(axis=(0, 1)))
