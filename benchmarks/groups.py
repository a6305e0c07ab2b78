"""Feature groups (issue 12): time to accuracy of grouped attributions against shap, Owen values
against shap's Partition explainer, budget adherence on the digits CNN through gRPC, and LIME
against the lime package at equal model evaluations.

Every comparison runs in one process, methods stepped in turn (benchmarks/_ladder.py), on the
same model function (the service's ONNX adapter), the same reference rows and the same groups:
shap sees the game through a coding of the players (benchmarks/_games.py), so both libraries
evaluate the very same rows. Speed is reported as ratios; the machine is shared.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks import _games, _lime
from benchmarks._games import Game
from benchmarks._ladder import Curve, geometric, run_curves
from benchmarks._models import CACHE, MODELS
from benchmarks._server import Call, call, p99_cell, plan, server
from explainers.base import Array, Budget, Estimator
from explainers.errors import ResourceExhausted
from explainers.registry import build_registry
from explainers.shapley.partition import PartitionOwen, owen_table
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

TARGETS = (0.05, 0.01)
SPEED_TARGET = 10.0  # issue 12: 10x faster than the best shap explainer at 5%


@dataclass(frozen=True)
class Config:
    image_rows: int  # digits per image case
    text_rows: int  # sentences
    table_rows: int  # rows of the one-hot table
    ref_pairs: int  # antithetic pairs of the 64-patch references
    cap_s: float  # a curve stops after a step slower than this per explanation
    owen_cap_s: float  # the same for the Owen curves (shap's are exact only at the whole tree)
    calls: int  # gRPC calls per adherence scenario
    sizes: tuple[int, ...] = (4, 8)  # patches per side of the image cases (16, 64 patches)


FULL = Config(image_rows=3, text_rows=3, table_rows=2, ref_pairs=20_000, cap_s=0.4,
              owen_cap_s=1.5, calls=100)
QUICK = Config(image_rows=1, text_rows=1, table_rows=1, ref_pairs=400, cap_s=0.02,
               owen_cap_s=0.05, calls=8, sizes=(2, 4))

Score = list[tuple[str, str, str, bool]]  # measurement, target, reached, met


@dataclass(frozen=True)
class Case:
    """Games explained side by side, their reference values and how they were made."""

    label: str
    games: list[Game]
    refs: list[Array]
    how: str

    @property
    def d(self) -> str:
        sizes = sorted({g.d for g in self.games})
        return str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"


def run(quick: bool) -> str:
    cfg = QUICK if quick else FULL
    score: Score = []
    shapley = _shapley_cases(cfg)
    owen = _owen_cases(cfg)
    parts = [_time_to_accuracy(shapley, cfg, score), _owen(owen, cfg, score),
             _adherence(cfg, score), _lime_section(_lime_cases(shapley), cfg)]
    return "\n\n".join([_intro(shapley, owen, quick), _scorecard(score), *parts])


# --- cases ------------------------------------------------------------------------------------
def _shapley_cases(cfg: Config) -> list[Case]:
    """Images (16 and 64 patches), text tokens, one-hot table groups; exact references up to
    16 groups, long antithetic runs beyond."""
    cases = []
    for side in cfg.sizes:
        games = _games.digits_games(cfg.image_rows, side)
        cases.append(_case(f"digits CNN, {side * side} patches", games, cfg))
    cases.append(_case("text model, tokens", _games.text_games(cfg.text_rows), cfg))
    cases.append(_case("one-hot table (MLP), 16 groups", _games.onehot_games(cfg.table_rows), cfg))
    return cases


def _case(label: str, games: list[Game], cfg: Config) -> Case:
    if max(g.d for g in games) <= 16:
        return Case(label, games, [_games.exact_shapley(g) for g in games],
                    "exact (every coalition)")
    return Case(label, games, [_games.sampled_shapley(g, cfg.ref_pairs) for g in games],
                f"{cfg.ref_pairs:,} antithetic pairs")


def _owen_cases(cfg: Config) -> list[Case]:
    """The same games over binary hierarchies (k-d trees of patches, halves of sentences),
    which shap's Partition explainer can take; exact Owen values as references."""
    cases = []
    for side in cfg.sizes:
        games = _games.digits_games(cfg.image_rows, side, binary=True)
        cases.append(Case(f"digits CNN, {side * side} patches, k-d tree", games,
                          [_games.exact_owen(g) for g in games], "exact Owen"))
    games = _games.text_games(cfg.text_rows, binary=True)
    cases.append(Case("text model, tokens, halves", games, [_games.exact_owen(g) for g in games],
                      "exact Owen"))
    return cases


def _intro(shapley: list[Case], owen: list[Case], quick: bool) -> str:
    lines = ["## Feature groups: images, text and one-hot blocks (issue 12)", "",
             "In sections 1 and 2, ms = CPU milliseconds per explanation (see section 1).",
             "",
             "Games (the service's ONNX adapter; digits explained for their predicted class "
             "against zeros, the model's default baseline; sentences for class *positive* "
             "against the mask token; the table against its 100 background rows):", "",
             "| case | groups | rows explained | reference | model rows/s |",
             "|---|---|---|---|---|"]
    for c in [*shapley, *owen]:
        rate = c.games[0].model.onnx.rows_per_second
        lines.append(f"| {c.label} | {c.d} | {len(c.games)} | {c.how} | {rate / 1e3:,.0f}k |")
    mode = "quick (smoke test: one row per case, tiny grids)" if quick else "full"
    lime = "compared in section 4" if importlib.util.find_spec("lime") else \
        "not installed here: section 4 (LIME at equal model evaluations) was skipped"
    return "\n".join([*lines, "", f"Mode: {mode}. The lime package: {lime}. The machine is "
                      "shared with "
                      "other work (2 cores): absolute times are for orientation only; the "
                      "ratios come from methods stepped in turn in one process, timed in CPU "
                      "time (sections 1-2); section 3 is wall time by nature."])


def _scorecard(score: Score) -> str:
    lines = ["### Targets", "", "| measurement | target | reached | |", "|---|---|---|---|"]
    lines += [f"| {m} | {t} | {r} | {'met' if ok else '**missed**'} |" for m, t, r, ok in score]
    return "\n".join([*lines, "", WHY])


WHY = """Why the misses (mechanisms; the figures vary between runs on this shared machine, by up
to half on 2026-12-03, the tables below are this run's; lowering the kernel's fixed cost per call on
2026-12-03 (the full fit by LU, no model call for a baseline that already holds the pads: 5-7%
less CPU on the texts) moved none of them by more than the noise):

- *Images and text against one baseline row (~5-12x, not 10x everywhere)*: over the runs of
  2026-12-02 and -03 (the second on a machine that ran every model about half as fast, and
  whose speed moved by up to 40% between runs), 16 patches reached 9.9-12.2x, 64 patches
  6.0-7.9x and the texts 4.7-7.5x. A coalition costs one
  model row for both libraries (~2.5 µs on the CNN); shap's PermutationExplainer samples
  antithetic permutations, Sidelight `auto` (against one row, from 13 groups; permutations for
  the texts' 11-12 tokens, where the fit's own cost outweighs its saving) paired KernelSHAP with
  the size-1 pairs enumerated, which reached 5% with 2.5-3x fewer evaluations, plus less cost
  around each evaluation. Three changes of 2026-12-02 moved these ratios from 3.6-5.9x to
  4.7-9.9x: the kernel's bookkeeping (each jackknife group's normal equations, the
  leave-one-group-out solves) as batched products, 35% less CPU per explanation at equal
  evaluations; the 120 size-2 pairs of 16 patches enumerated once the budget affords four times
  their cost (30-35% lower error at equal evaluations from ~1,000 on); and masked rows built in
  C order for games with dummy players (the 64-patch digits have 32-36 live patches, the one-hot
  table's permutation rows too). The model's own time is now about 60% of the total, so the rest
  needs fewer evaluations, not leaner code; the texts (4.7-5.5x over runs) are explained in ~2
  ms, where a few hundred microseconds of fixed cost per call weigh most. A regression
  adjustment (boosted trees over the coalitions, cross-fitted, their Shapley values exact:
  Witter, Liu & Musco 2025; explainers/shapley/surrogate.py) cut the kernel fit's error 2-3.5x
  at equal evaluations on 11-13 live patches and on the texts (so 4-10x fewer evaluations to
  5%), with 95% intervals covering 95-97%; but fitting the trees costs 4-25 ms of CPU per fold,
  more than the 1-5 ms of model time it saves on these fast models (measured: 16 patches 8.8 ->
  15 ms to 5%, texts 3.3 -> 8.4 ms; smaller ensembles, 6-10 trees of depth 3, fit in about a
  millisecond but cut the error too little: 16 patches 8.4 -> 10.4 ms). It is therefore used
  only when it costs at most half the model time spent (a model slower than ~50k rows/s), not
  here. At 64 patches (32-36 live) the trees cut the error only 5-25%.
- *One-hot table (~6-8x)*: against 100 background rows Sidelight draws one row per antithetic
  pair while shap evaluates every coalition on all 100 rows, so the lead is largest at 1%
  (~25-40x). At 5% the better shap is its Partition explainer, whose Owen values over the groups
  in order happen to lie within 5% of the Shapley values on this model (its floor, 4.95%, is
  just under the target): against shap's PermutationExplainer the lead is ~10x.
- *shap Partition on Shapley references*: it estimates Owen values, which are not Shapley
  values; its error stops at the gap between the two (18-38% on the images and texts), so it
  never reaches 5% there (*never*).
- *Budget adherence of the anytime methods*: `permutation`, and `partition` on 64 pixels (its
  exact enumeration, 14,800 coalitions, needs half of a budget of ~80 ms at full speed and more
  under load, so smaller budgets sample hierarchical orders), work until the server's deadline
  (the budget less 3 ms + 3%) whenever they sample, so such a call ends at ~0.95 of its budget
  and any stall longer than that reserve shows in the p99. With a load average L well above 2
  (last column: other work on the 2 cores) the process gets about 2/L of a core, so a round
  planned from the rows/s measured a moment before takes up to L/2 times as long, and the
  anytime loop only sees it after the round (measured in process at load 8: p50 1.01, p90 1.1,
  max 1.7-1.9 of the budget given to the estimator). Over seven runs of this section on
  2026-12-02 at load averages 3-8, the p99 of `permutation` ranged 1.00-1.63 and that of 64
  pixels 0.99-2.79, the calls under 50 ms worst: a figure of the machine's load as much as of
  the server. On an idle machine the tabular models' serial p99 was 0.97 (Shapley section); the
  default method on the digits (`partition`, exact over 16 patches in a few ms) stays far below
  its budgets either way. On 2026-12-03 (load average below 1, but models running at half the
  previous day's speed) five runs gave p99s of 0.98-1.03 for both: the servers' own clock
  stopped at 0.94-0.97 of the budget, and what it cannot see (the request reaching the handler,
  the response reaching the client: 1.2 ms at the median) plus stalls of 2-4 ms (a round overrun,
  a request waiting for its handler thread), in about 1 call in 50, fill the rest. Budgets now
  count from the request's arrival, its decoding included (it was outside them)."""


# --- 1. time to accuracy ----------------------------------------------------------------------
def _explain_with(est: Estimator, games: list[Game]) -> Callable[[Array, int, int], Array]:
    """Curve function: row index, evaluation count, seed -> phi (d,)."""
    def explain(i: Array, n: int, seed: int) -> Array:
        g = games[int(i)]
        while True:  # a cap below the estimator's least answer buys that answer (timed)
            try:
                e = est.explain(g.model.evaluator(), g.x, g.refs, Budget(np.inf, n),
                                np.random.default_rng(seed), g.groups)
                return np.asarray(e.values[0])
            except ResourceExhausted:
                n *= 2
    return explain


def _shap_with(games: list[Game], kind: str) -> Callable[[Array, int, int], Array]:
    """shap's Permutation or Partition explainer on each game's coded form (built and warmed
    once per game, outside the timings)."""
    import shap

    explainers = []
    for g in games:
        f, x, background = g.coded()
        h = g.groups.hierarchy or _games.kd_tree((g.d,))
        masker = shap.maskers.Independent(background, max_samples=g.refs.rows) \
            if kind == "permutation" else \
            shap.maskers.Partition(background, max_samples=g.refs.rows,
                                   clustering=_games.linkage(h))
        cls = shap.PermutationExplainer if kind == "permutation" else shap.PartitionExplainer
        explainer = cls(f, masker)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            explainer(x[None], max_evals=2 * g.d + 1, silent=True)  # numba compiles here
        explainers.append((explainer, x))

    def explain(i: Array, n: int, seed: int) -> Array:
        explainer, x = explainers[int(i)]
        np.random.seed(seed)
        return np.asarray(explainer(x[None], max_evals=n, silent=True).values[0])
    return explain


Start = Callable[[int, int], int]  # (players, reference rows) -> first evaluation count
Ours = list[tuple[str, Estimator, Start]]


def sampled_start(d: int, refs: int) -> int:
    """Samplers drawing one reference row per pair: a few pairs."""
    return max(64, 4 * d)


def all_rows_start(d: int, refs: int) -> int:
    """Methods evaluating every reference row per coalition: a few coalitions each."""
    return max(64, 8 * d * refs)


def _curves(case: Case, cap_s: float, ours: Ours, theirs: tuple[str, ...]) -> list[Curve]:
    """Error-time curves (CPU time) of our estimators and shap's explainers, stepped in turn."""
    d = max(g.d for g in case.games)
    refs = case.games[0].refs.rows
    curves = [Curve(name, _explain_with(est, case.games), geometric(start(d, refs), 1e8))
              for name, est, start in ours]
    for kind in theirs:
        curves.append(Curve(f"shap {kind.capitalize()}Explainer", _shap_with(case.games, kind),
                            geometric(2 * d + 1, 1e7)))
    values = np.empty(len(case.refs), dtype=object)
    values[:] = case.refs
    run_curves(curves, np.arange(len(case.games)), values, 1, floor=0.8 * min(TARGETS),
               cap_s=cap_s, clock=time.process_time)
    return curves


def _time_to_accuracy(cases: list[Case], cfg: Config, score: Score) -> str:
    registry = build_registry()
    ours: Ours = [("Sidelight auto", registry["auto"], sampled_start),
                  ("Sidelight kernel", registry["kernel"], all_rows_start)]
    lines = ["### 1. Grouped Shapley values: time to accuracy against shap (target: 10x "
             "faster than the better shap explainer at 5%)", "",
             "CPU time per explanation (this process's, which onnxruntime's one thread per "
             "session and shap's calls of the same model function both run in: the other work "
             "on the shared machine moves it far less than wall time) to reach a "
             "root-mean-square relative error "
             "||phi - phi_ref|| / ||phi_ref|| of 5% and 1%, each method given doubling "
             "evaluation counts (log-log interpolation; *~* = extrapolated past the last step "
             "with error ~ time^-1/2; *never* = the method's error stalls above the target). "
             "Sidelight `auto` = exact enumeration once the evaluation count allows it, else "
             "paired KernelSHAP against one row from 13 groups, antithetic permutations "
             "otherwise; `kernel` = paired KernelSHAP (every reference row per "
             "coalition). shap's Partition explainer is given a k-d tree over the "
             "patches (halves of the sentence; the groups in order for the table).", "",
             "| case | method | ms to 5% | ms to 1% | error at last step | last step ms |",
             "|---|---|---|---|---|---|"]
    summary = ["", "| case | Sidelight ms to 5% | better shap ms to 5% | speed-up at 5% | "
               "speed-up at 1% |", "|---|---|---|---|---|"]
    for case in cases:
        curves = _curves(case, cfg.cap_s, ours, ("permutation", "partition"))
        lines += [_curve_row(case.label, c) for c in curves]
        summary.append(_speedup_row(case.label, curves, score))
    return "\n".join(lines + summary)


def _time_to(c: Curve, target: float) -> tuple[float, bool]:
    """Seconds to `target`: interpolated on the curve, but never more than a step that was
    already there (an exact step can be cheaper than the sampled one before it); inf when the
    error stalled above the target (a biased method)."""
    below = [c.seconds[i] for i, e in enumerate(c.errors) if e <= target]
    if not below:
        return (float("inf"), False) if _stalled(c) else c.time_to(target)
    if 0.0 in c.errors:  # an exact answer: no error law to interpolate with
        return min(below), False
    seconds, extrapolated = c.time_to(target)
    return (seconds, extrapolated) if seconds <= min(below) else (min(below), False)


def _stalled(c: Curve) -> bool:
    """Two doublings of the evaluations bought less than a fifth of the error (an unbiased
    sampler halves it): a floor, not noise."""
    return len(c.errors) >= 4 and c.errors[-1] > 0.8 * c.errors[-3]


def _ms(c: Curve, target: float) -> str:
    seconds, extrapolated = _time_to(c, target)
    if not np.isfinite(seconds):
        return "never"
    return f"{'~' if extrapolated else ''}{1e3 * seconds:.1f}"


def _curve_row(label: str, c: Curve) -> str:
    return (f"| {label} | {c.method} | {_ms(c, TARGETS[0])} | {_ms(c, TARGETS[1])} | "
            f"{c.errors[-1]:.2%} | {1e3 * c.seconds[-1]:.1f} |")


def _speedup_row(label: str, curves: list[Curve], score: Score) -> str:
    """Sidelight's best time to each target against shap's best, and the score at 5%."""
    mine = [min(_time_to(c, t)[0] for c in curves if c.method.startswith("Sidelight"))
            for t in TARGETS]
    best = [min(_time_to(c, t)[0] for c in curves if c.method.startswith("shap"))
            for t in TARGETS]
    ratio = [_ratio(b, m) for b, m in zip(best, mine, strict=True)]
    score.append((f"1. speed-up at 5% vs better shap, {label}", f">= {SPEED_TARGET:.0f}x",
                  f"{ratio[0]:.1f}x", ratio[0] >= SPEED_TARGET))
    return (f"| {label} | {1e3 * mine[0]:.1f} | {1e3 * best[0]:.1f} | **{ratio[0]:.1f}x** | "
            f"{_times(ratio[1])} |")


def _ratio(theirs: float, ours: float) -> float:
    """theirs / ours; inf when only theirs never gets there, nan when neither does."""
    if not np.isfinite(ours):
        return float("nan")
    return theirs / ours


def _times(ratio: float) -> str:
    return "shap never" if np.isinf(ratio) else "-" if np.isnan(ratio) else f"{ratio:.1f}x"


# --- 2. Owen values ---------------------------------------------------------------------------
def _owen(cases: list[Case], cfg: Config, score: Score) -> str:
    lines = ["### 2. Owen values over a hierarchy: Sidelight `partition` against shap's "
             "Partition explainer", "",
             "The same binary hierarchy for both (shap's Partition explainer takes binary "
             "trees only); references are exact Owen values (Sidelight's enumeration). "
             "*shap full* = shap's error once its evaluation count covers the whole tree: "
             "the agreement of the two exact answers. Sidelight builds the exact formula's table "
             "once per hierarchy (kept in a bounded cache); its first-call cost is shown apart "
             "and is not in the curves.", "",
             "| case | method | ms to 5% | ms to 1% | error at last step | last step ms |",
             "|---|---|---|---|---|---|"]
    summary = ["", "| case | speed-up at 5% | speed-up at 1% | shap full vs exact | "
               "table build ms (first call) |", "|---|---|---|---|---|"]
    for case in cases:
        build = _table_ms(case)
        ours: Ours = [("Sidelight partition", PartitionOwen(), sampled_start)]
        curves = _curves(case, cfg.owen_cap_s, ours, ("partition",))
        lines += [_curve_row(case.label, c) for c in curves]
        ratio = [_ratio(_time_to(curves[1], t)[0], _time_to(curves[0], t)[0])
                 for t in TARGETS]
        full = _shap_full(case)
        summary.append(f"| {case.label} | **{_times(ratio[0])}** | {_times(ratio[1])} | "
                       f"{full:.1e} | {build:.1f} |")
        score.append((f"2. Owen speed-up at 5% vs shap Partition, {case.label}", "> 1x",
                      f"{ratio[0]:.1f}x", ratio[0] > 1))
    return "\n".join(lines + summary)


def _table_ms(case: Case) -> float:
    """Building the exact formula's table of the case's hierarchy (kept per hierarchy after,
    so the curves and the server pay it once)."""
    h = case.games[0].groups.hierarchy
    assert h is not None
    start = time.perf_counter()
    owen_table(h)
    return 1e3 * (time.perf_counter() - start)


def _shap_full(case: Case) -> float:
    """Largest relative error of shap's Partition explainer with evaluations enough for the
    whole tree, against the exact Owen values."""
    explain = _shap_with(case.games, "partition")
    worst = 0.0
    for i, (g, ref) in enumerate(zip(case.games, case.refs, strict=True)):
        phi = explain(np.array(i), 8 * g.d * g.d + 64, 0)
        worst = max(worst, float(np.linalg.norm(phi - ref) / np.linalg.norm(ref)))
    return worst


# --- 3. budget adherence ----------------------------------------------------------------------
SCENARIOS: tuple[tuple[str, dict[str, object]], ...] = (
    ("default (`partition`, 4 x 4 patches)", {}),
    ("`permutation`, 4 x 4 patches", {"method": "permutation"}),
    ("`partition`, one group per pixel (64)", {"groups": pb.FeatureGroups(patch=[1])}),
)


def _adherence(cfg: Config, score: Score) -> str:
    digits = np.load(MODELS / "digits_cnn" / "background.npy")  # (100, 1, 8, 8)
    lines = ["### 3. Budget adherence on the digits CNN through the gRPC server (target: p99 "
             "<= 1.0)", "",
             f"{cfg.calls} Explain calls per scenario, one client, budgets log-uniform in "
             "20-500 ms, a different digit and seed per call, server in its own process with "
             "its result cache off; *wall* = the client's round trip, *server* = the "
             "response's cost.elapsed_ms, each / budget; *load average* = the machine's "
             "1-minute load average before and after the scenario (2 cores, shared).", "",
             "| scenario | OK | wall p50 | wall p99 | wall max | wall p99, < 50 ms | "
             "wall p99, >= 50 ms | server p50 | server p99 | other codes | load average |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    with server(_repository()) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        stub = pb_grpc.ExplainerStub(ch)
        for label, fields in SCENARIOS:
            before = os.getloadavg()[0]
            calls = _calls(stub, digits, cfg.calls, fields)
            row, p99 = _adherence_row(label, calls)
            lines.append(f"{row} {before:.1f} -> {os.getloadavg()[0]:.1f} |")
            score.append((f"3. p99 wall / budget, digits CNN, {label}", "<= 1.0",
                          f"{p99:.3f}", p99 <= 1.0))
    return "\n".join(lines)


def _repository() -> Path:
    repo = CACHE / "repo_groups"
    if not (repo / "digits_cnn").exists():
        shutil.copytree(MODELS / "digits_cnn", repo / "digits_cnn")
    return repo


def _calls(stub: pb_grpc.ExplainerStub, digits: Array, n: int,
           fields: dict[str, object]) -> list[Call]:
    call(stub, "digits_cnn", digits[0], 100.0, 5.0, True, 0, "image", **fields)  # warm up
    out = []
    for i, b in enumerate(plan(n, 20.0, 500.0, seed=12)):
        out.append(call(stub, "digits_cnn", digits[i % len(digits)], b, b / 1e3 + 1.0, True,
                        i + 1, "image", **fields))
        time.sleep(0.002)
    return out


def _adherence_row(label: str, calls: list[Call]) -> tuple[str, float]:
    ok = [c for c in calls if c.code == "OK"]
    wall = np.array([c.wall_ms / c.budget_ms for c in ok])
    srv = np.array([c.server_ms / c.budget_ms for c in ok])
    codes = sorted({c.code for c in calls} - {"OK"})
    other = ", ".join(f"{k} x{sum(c.code == k for c in calls)}" for k in codes) or "-"
    small = np.array([c.budget_ms < 50 for c in ok], bool)
    q = np.percentile
    p99 = float(q(wall, 99)) if wall.size else float("inf")
    return (f"| {label} | {len(ok)}/{len(calls)} | {q(wall, 50):.2f} | **{p99:.2f}** | "
            f"{wall.max():.2f} | {p99_cell(wall[small])} | {p99_cell(wall[~small])} | "
            f"{q(srv, 50):.2f} | {q(srv, 99):.2f} | {other} |", p99)



# --- 4. LIME ----------------------------------------------------------------------------------
def _lime_cases(shapley: list[Case]) -> list[Case]:
    """The image and text games of section 1, with the population LIME coefficients as the
    reference (the table's background game is not one lime's image explainer can play)."""
    return [Case(c.label, c.games, [_lime.population(g) for g in c.games],
                 "every on/off vector" if max(g.d for g in c.games) <= 16 else
                 f"{_lime.POPULATION_SAMPLES:,} on/off vectors")
            for c in shapley if c.games[0].refs.rows == 1]


def _lime_section(cases: list[Case], cfg: Config) -> str:
    if importlib.util.find_spec("lime") is None:
        return "### 4. LIME\n\nSkipped: the lime package is not installed."
    lines = ["### 4. LIME at equal model evaluations: Sidelight `lime` against the lime package",
             "", LIME_HOW, "", "| case | method | ms to 5% | ms to 1% | error at last step | "
             "last step ms |", "|---|---|---|---|---|---|"]
    summary = ["", "| case | reference | speed-up at 5% | speed-up at 1% | CPU time ratio at "
               "equal samples (median over steps) | error at equal samples, Sidelight / "
               "lime (median) |", "|---|---|---|---|---|---|"]
    registry = build_registry()
    for case in cases:
        curves = [Curve("Sidelight lime", _explain_with(registry["lime"], case.games),
                        geometric(128, 1e8)),
                  Curve("lime LimeImageExplainer", _lime.package(case.games),
                        geometric(128, 1e8))]
        values = np.empty(len(case.refs), dtype=object)
        values[:] = case.refs
        run_curves(curves, np.arange(len(case.games)), values, 1, floor=0.8 * min(TARGETS),
                   cap_s=cfg.cap_s, clock=time.process_time)
        lines += [_curve_row(case.label, c) for c in curves]
        summary.append(_lime_row(case, *curves))
    return "\n".join(lines + summary)


LIME_HOW = ("Both estimate the same thing: the lime package's LimeImageExplainer with its "
            "defaults (kernel width 0.25 on the cosine distance, segments kept with "
            "probability 1/2, Ridge(alpha=1)) is given the game as an image (the grouped "
            "elements as pixels, the groups as segments, the baseline as its hide colour; a "
            "text's live tokens as a 1 x L image, pads kept by the classifier function) and "
            "its whole neighbourhood in one model call (its default, 10 images per call, only "
            "adds time); Sidelight `lime` samples the same on/off distribution with the same "
            "weights. Reference: the population fit, the weighted least squares over every "
            "on/off vector (up to 16 groups) or over 2^20 uniform ones (its own error is 1/16 "
            "of that of 4,096 samples). Error = ||coef - coef_ref|| / ||coef_ref||, CPU "
            "milliseconds per explanation, samples doubling from 128 (benchmarks/_lime.py). "
            "Not the one-hot table: lime's tabular explainer discretises and samples from "
            "training statistics, another game.")


def _lime_row(case: Case, ours: Curve, theirs: Curve) -> str:
    """Speed-ups to each target, and the two at the same sample counts (time and error)."""
    ratio = [_ratio(_time_to(theirs, t)[0], _time_to(ours, t)[0]) for t in TARGETS]
    k = min(len(ours.seconds), len(theirs.seconds))
    time_ratio = np.median(np.array(theirs.seconds[:k]) / np.array(ours.seconds[:k]))
    err_ratio = np.median(np.array(ours.errors[:k]) / np.array(theirs.errors[:k]))
    return (f"| {case.label} | {case.how} | **{_lime_times(ratio[0])}** | "
            f"{_lime_times(ratio[1])} | {time_ratio:.1f}x | {err_ratio:.2f} |")


def _lime_times(ratio: float) -> str:
    return "lime never" if np.isinf(ratio) else "-" if np.isnan(ratio) else f"{ratio:.1f}x"
