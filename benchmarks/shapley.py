"""Shapley values under latency budgets (issue 3): overhead over plain onnxruntime, time to
accuracy against shap, error at fixed budgets, calibration of the 95% intervals, and budget
adherence through the gRPC server.

Models: the bundled breast-cancer MLP (log-odds) and GBDT (margin = log-odds), 30 features, and
a 100-feature synthetic ReLU MLP, each with a 100-row background, all through the service's
ONNX adapter. Reference values are against the whole background (see benchmarks/_reference.py).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from benchmarks import _models
from benchmarks._ladder import Curve, geometric, run_curves
from benchmarks._models import Case
from benchmarks._reference import reference
from benchmarks._server import Call, plan, run_calls, server
from benchmarks._server import p99_cell as _p99
from explainers.base import Array, Budget, Explanation
from explainers.errors import SidelightError
from explainers.registry import build_registry
from explainers.shapley.kernel import KernelShap
from explainers.shapley.permutation import PermutationShapley

TARGETS = (0.05, 0.01)
BUDGETS_MS = (10.0, 50.0, 200.0)


@dataclass(frozen=True)
class Config:
    rows: int  # explained rows per 30-feature model (fixed budgets, calibration)
    synthetic_rows: int  # explained rows of the 100-feature model
    ref_pairs: int  # reference pairs per background row (doubled for the 100-feature model)
    curve_rows: int  # rows per step of the time-to-accuracy curves
    cap_s: float  # a curve stops after a step slower than this per explanation
    calls: int  # gRPC calls per adherence scenario


FULL = Config(rows=20, synthetic_rows=6, ref_pairs=1000, curve_rows=5, cap_s=2.0, calls=200)
QUICK = Config(rows=4, synthetic_rows=2, ref_pairs=150, curve_rows=2, cap_s=0.3, calls=40)


@dataclass(frozen=True)
class Ref:
    values: Array  # (rows, features)
    std_errors: Array  # (rows, features)
    how: str


Score = list[tuple[str, str, str, bool]]  # measurement, target, reached, met


def run(quick: bool) -> str:
    cfg = QUICK if quick else FULL
    cases = _models.cases(cfg.rows, cfg.synthetic_rows)
    refs = {c.name: _reference(c, cfg) for c in cases}
    score: Score = []
    parts = [OVERHEAD]
    curves = {c.name: _curves(c, refs[c.name], cfg) for c in cases}
    parts.append(_time_to_accuracy(cases, curves, score))
    runs = {c.name: _fixed_budgets(c, "auto") for c in cases}
    kernel = {c.name: _fixed_budgets(c, "kernel", BUDGETS_MS[1:]) for c in cases}
    parts += [_fixed_budget_table(cases, runs, refs, curves),
              _calibration(cases, runs, kernel, refs, score), _adherence(cases, cfg, score)]
    return "\n\n".join([_intro(cases, refs, cfg, quick), _scorecard(score), *parts])


def _scorecard(score: Score) -> str:
    lines = ["### Targets", "", "| measurement | target | reached | |", "|---|---|---|---|"]
    lines += [f"| {m} | {t} | {r} | {'met' if ok else '**missed**'} |" for m, t, r, ok in score]
    return "\n".join([*lines, "", WHY])


WHY = """Why the misses (mechanisms; the figures are in the tables below):

- *5% on the 30-feature models*: the permutation sampler reaches 5% about when its pairs have
  covered the 100 background rows (~130 pairs, ~7,500 model rows; before, the spread of
  phi(x; z) across rows dominates). shap's PermutationExplainer gets there with ~12
  permutations over all rows, ~75,000 model rows: ~10x more rows, so with the fixed costs
  above, the fast MLP lands at ~3.5x and the GBDT at ~5-9x (it varies with the rows drawn). At
  1%, where the stratified estimate's low variance counts, the lead is ~10-20x. Penalised
  regression on the rows' own features cut the first sweep's variance by up to 1.7x more, but
  under-covered by 1-3 points, so it is not used.
- *Calibration on the GBDT* (when it misses): tree attributions are sparse and heavy-tailed (a
  feature's contribution comes from a few background rows or a few orderings), so a sample that
  missed them reports a small error bar for an error it has not seen; the per-attribution
  degrees of freedom widen intervals resting on few rows but cannot see rows never visited.
  For tree models `auto` picks exact TreeSHAP anyway.
- *4 concurrent clients*: 4 CPU-bound explanations and 4 client threads share 2 cores, so
  the gRPC and response work outside the estimators (~1.5-2 ms per call alone) stretches to
  ~4 ms median and ~10 ms p99; for 5-20 ms budgets that alone exceeds 10%. The server keeps
  back 3 ms + 3% per call and, when more explanations run than cores, another
  (in flight / cores - 1) x (2.5 ms + 2%); larger reserves cost accuracy and turned more
  small-budget calls into RESOURCE_EXHAUSTED refusals. Letting only one explanation per core
  compute at once (the others waiting for a slot) brought the server-side p99 to ~1.0 but not
  the client's (the transport share stays), and refused up to 45% of the small-budget calls
  that could not get a slot in time, so it is not used."""


def _reference(case: Case, cfg: Config) -> Ref:
    pairs = cfg.ref_pairs * (2 if case.d > 30 else 1)
    values, se, how = reference(case, pairs)
    return Ref(values, se, how)


def _intro(cases: list[Case], refs: dict[str, Ref], cfg: Config, quick: bool) -> str:
    lines = ["## Shapley values under a latency budget (issue 3)", "",
             "Models (background 100 rows each, explained through the service's ONNX adapter; "
             "rows/s and batch size as measured at load):", "",
             "| model | features | rows/s | batch | reference | reference SE / norm |",
             "|---|---|---|---|---|---|"]
    for c in cases:
        r = refs[c.name]
        rel = np.linalg.norm(r.std_errors, axis=1) / np.linalg.norm(r.values, axis=1)
        lines.append(f"| {c.label} | {c.d} | {c.model.rows_per_second / 1e6:.2f}M | "
                     f"{c.model.chunk_rows} | {r.how} | {np.mean(rel):.2%} |")
    mode = "quick (smoke test: few rows, rough references)" if quick else "full"
    lines += ["", f"Mode: {mode}. GBDT is explained on its margin (the ensemble's "
              "post_transform set to NONE), where exact TreeSHAP is the exact answer; "
              f"{cfg.rows} rows of the held-out split (30-feature models), {cfg.synthetic_rows} "
              "synthetic rows."]
    return "\n".join(lines)


# --- 1. overhead ------------------------------------------------------------------------------
OVERHEAD = """### 1. Overhead over plain onnxruntime (target <= 1.15)

Measured in its own section, "Overhead over the onnxruntime floor" (`python -m benchmarks.run
--only overhead`): these three models and the cheap ones of issue 17, the row builder before and
after side by side in one run, masking inside onnxruntime, and where the time goes."""


# --- 2. time to accuracy ----------------------------------------------------------------------
def _curves(case: Case, ref: Ref, cfg: Config) -> list[Curve]:
    """Error-time curves of the Sidelight samplers and of shap's two explainers."""
    import shap

    f, bg, d = case.fn(), case.background, case.d
    X, refs = case.X[:cfg.curve_rows], ref.values[:cfg.curve_rows]

    def sidelight(est: object) -> Callable[[Array, int, int], Array]:
        def explain(x: Array, n: int, seed: int) -> Array:
            e = est.explain(case.evaluator(f), x, bg, Budget(np.inf, n),  # type: ignore[attr-defined]
                            np.random.default_rng(seed))
            return np.asarray(e.values[0])
        return explain

    def f1(Z: Array) -> Array:
        return np.asarray(f(np.asarray(Z, np.float64))[:, 0])

    masker = shap.maskers.Independent(bg.data, max_samples=bg.rows)
    perm = shap.PermutationExplainer(f1, masker)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        perm(X[:1], max_evals=2 * d + 1, silent=True)  # numba compiles on the first call
        kern = shap.KernelExplainer(f1, bg.data)

    def shap_perm(x: Array, n: int, seed: int) -> Array:
        np.random.seed(seed)
        return np.asarray(perm(x[None], max_evals=n, silent=True).values[0])

    def shap_kernel(x: Array, n: int, seed: int) -> Array:
        np.random.seed(seed)
        return np.asarray(kern.shap_values(x[None], nsamples=n, l1_reg=False,
                                           silent=True)).reshape(-1)

    memory_cap = int(4e8 / (8 * bg.rows * d))  # KernelExplainer holds nsamples x rows x d
    curves = [
        Curve("Sidelight permutation (auto)", sidelight(PermutationShapley()),
              geometric(2_000, 5e7)),
        Curve("Sidelight kernel, all rows per coalition", sidelight(KernelShap()),
              geometric(20 * d * bg.rows, 5e8)),
        Curve("Sidelight kernel, one row per pair", sidelight(KernelShap(True)),
              geometric(max(2_000, 40 * d), 2e6)),
        Curve("shap PermutationExplainer", shap_perm, geometric(2 * d + 1, 1e7)),
        Curve("shap KernelExplainer (l1_reg=False)", shap_kernel,
              geometric(2 * d + 64, memory_cap)),
    ]
    run_curves(curves, X, refs, 1, floor=0.8 * min(TARGETS), cap_s=cfg.cap_s)
    return curves


def _time_to_accuracy(cases: list[Case], curves: dict[str, list[Curve]], score: Score) -> str:
    lines = ["### 2. Time to accuracy (target: >= 10x faster than the better shap explainer at "
             "5%, and faster at 1%)", "",
             "Wall time per explanation to reach a root-mean-square relative error "
             "||phi - phi_ref|| / ||phi_ref|| of 5% and 1% over the curve rows, each method "
             "given doubling evaluation counts (interpolated on log-log axes; *~* = "
             "extrapolated beyond the last step with error ~ time^-1/2, for methods that hit "
             "the per-step time cap or shap's memory cap first).", "",
             "| model | method | ms to 5% | ms to 1% | error at last step | last step ms |",
             "|---|---|---|---|---|---|"]
    summary = ["", "| model | speed-up at 5% vs better shap | speed-up at 1% |", "|---|---|---|"]
    for case in cases:
        cs = curves[case.name]
        for c in cs:
            cells = [_ms(*c.time_to(t)) for t in TARGETS]
            lines.append(f"| {case.label} | {c.method} | {cells[0]} | {cells[1]} | "
                         f"{c.errors[-1]:.2%} | {1e3 * c.seconds[-1]:.1f} |")
        ours = [min(c.time_to(t)[0] for c in cs if c.method.startswith("Sidelight perm"))
                for t in TARGETS]
        theirs = [min(c.time_to(t)[0] for c in cs if c.method.startswith("shap")) for t in TARGETS]
        summary.append(f"| {case.label} | **{theirs[0] / ours[0]:.1f}x** | "
                       f"**{theirs[1] / ours[1]:.1f}x** |")
        score += [(f"2. speed-up at 5% vs better shap, {case.label}", ">= 10x",
                   f"{theirs[0] / ours[0]:.1f}x", theirs[0] / ours[0] >= 10),
                  (f"2. speed-up at 1%, {case.label}", "> 1x", f"{theirs[1] / ours[1]:.1f}x",
                   theirs[1] > ours[1])]
    return "\n".join(lines + summary)


def _ms(seconds: float, extrapolated: bool) -> str:
    return f"{'~' if extrapolated else ''}{1e3 * seconds:.1f}"


# --- 3. fixed budgets -------------------------------------------------------------------------
Runs = dict[float, list[tuple[int, Explanation, float]]]  # budget -> (row, answer, seconds)


def _fixed_budgets(case: Case, method: str, budgets: tuple[float, ...] = BUDGETS_MS) -> Runs:
    """`method` under each wall-clock budget, every explained row: (explanation, seconds)."""
    est, f = build_registry()[method], case.fn()
    out: Runs = {b: [] for b in budgets}
    for i, x in enumerate(case.X):
        for b in budgets:
            start = time.perf_counter()
            try:
                e = est.explain(case.evaluator(f), x, case.background,
                                Budget.of_seconds(b / 1e3), np.random.default_rng(i))
            except SidelightError:  # kernel refuses budgets its least sound sample cannot fit
                continue
            out[b].append((i, e, time.perf_counter() - start))
    return out


def _fixed_budget_table(cases: list[Case], runs: dict[str, Runs], refs: dict[str, Ref],
                       curves: dict[str, list[Curve]]) -> str:
    lines = ["### 3. Error at a fixed budget", "",
             "`auto` (exact does not fit at 30 or 100 features, so the permutation sampler) "
             "given a wall-clock budget per row. *error* = RMS relative error against the "
             "reference, *reported* = RMS of ||SE|| / ||phi||, *shap perm* = "
             "PermutationExplainer's error at the same wall time (from its curve above).", "",
             "| model | budget ms | error | reported | evaluations | pairs | elapsed / budget "
             "(max) | shap perm |", "|---|---|---|---|---|---|---|---|"]
    for case in cases:
        ref = refs[case.name].values
        shap_perm = next(c for c in curves[case.name] if c.method.startswith("shap Perm"))
        for b in BUDGETS_MS:
            es = runs[case.name][b]
            if not es:
                lines.append(f"| {case.label} | {b:.0f} | refused | | | | | |")
                continue
            err = [np.linalg.norm(e.values[0] - ref[i]) / np.linalg.norm(ref[i])
                   for i, e, _ in es]
            rep = [np.linalg.norm(e.std_errors[0]) / np.linalg.norm(ref[i]) for i, e, _ in es]
            worst = max(s for _, _, s in es) / (b / 1e3)
            lines.append(
                f"| {case.label} | {b:.0f} | {_rms(err):.2%} | {_rms(rep):.2%} | "
                f"{np.mean([e.evaluations for _, e, _ in es]):,.0f} | "
                f"{np.mean([e.samples for _, e, _ in es]):.0f} | {worst:.2f} | "
                f"{shap_perm.error_at(b / 1e3):.1%} |")
    return "\n".join(lines)


def _rms(values: list[float]) -> float:
    return float(np.sqrt(np.mean(np.square(values))))


# --- 4. calibration ---------------------------------------------------------------------------
def _calibration(cases: list[Case], runs: dict[str, Runs], kernel: dict[str, Runs],
                 refs: dict[str, Ref], score: Score) -> str:
    lines = ["### 4. Calibration of the 95% intervals (target: 93-97%)", "",
             "Share of reference values inside the reported 95% t intervals, over every "
             "(row, feature) pair of the fixed-budget runs (`auto` = the permutation sampler; "
             "kernel = all background rows per coalition; it refuses, RESOURCE_EXHAUSTED, "
             "rows whose budget cannot fit its enumerated pairs and least sound sample). For "
             "scale: the same intervals with the standard errors halved or doubled would cover "
             "the shares in the next columns. *ref / SE* = median ratio of "
             "the reference's own standard error to the reported one (small: the reference's "
             "noise does not move the figures; 0 = exact reference).", "",
             "| model | method | budget ms | rows answered | pairs | coverage | with SE / 2 | "
             "with SE x 2 | ref / SE |", "|---|---|---|---|---|---|---|---|---|"]
    total, per_model = np.zeros(2), {c.label: np.zeros(2) for c in cases}
    for label, source in (("auto", runs), ("kernel", kernel)):
        for case in cases:
            for b, explained in source[case.name].items():
                if not explained:
                    lines.append(f"| {case.label} | {label} | {b:.0f} | 0/{len(case.X)} "
                                 "(RESOURCE_EXHAUSTED) | - | - | - | - | - |")
                    continue
                inside, half, double, ratio = _coverage(explained, refs[case.name])
                if label == "auto":
                    total += [inside.sum(), inside.size]
                    per_model[case.label] += [inside.sum(), inside.size]
                lines.append(f"| {case.label} | {label} | {b:.0f} | "
                             f"{len(explained)}/{len(case.X)} | {inside.size} | "
                             f"**{inside.mean():.1%}** | {half:.1%} | {double:.1%} | "
                             f"{ratio:.2f} |")
    lines += ["", f"`auto`, all models and budgets: **{total[0] / total[1]:.1%}** of "
              f"{int(total[1])} (row, feature) pairs."]
    share = total[0] / total[1]
    score.append(("4. calibration, all models and budgets", "93-97%", f"{share:.1%}",
                  0.93 <= share <= 0.97))
    for label, (k, n) in per_model.items():
        score.append((f"4. calibration, {label}", "93-97%", f"{k / n:.1%}",
                      0.93 <= k / n <= 0.97))
    return "\n".join(lines)


def _coverage(runs: list[tuple[int, Explanation, float]], ref: Ref) -> tuple[Array, float,
                                                                             float, float]:
    inside, half, double, ratio = [], [], [], []
    for i, e, _ in runs:
        r, rse = ref.values[i], ref.std_errors[i]
        lo, hi = e.interval(0.95)
        width = (hi - lo)[0] / 2
        dev = np.abs(e.values[0] - r)
        inside.append(dev <= width)
        half.append(dev <= width / 2)
        double.append(dev <= width * 2)
        ok = e.std_errors[0] > 0
        ratio.append(rse[ok] / e.std_errors[0][ok])
    return (np.concatenate(inside), float(np.mean(half)), float(np.mean(double)),
            float(np.median(np.concatenate(ratio))))


# --- 5. budget adherence ----------------------------------------------------------------------
def _adherence(cases: list[Case], cfg: Config, score: Score) -> str:
    rows = {c.name: c.X for c in cases}

    def jobs(use_budget: bool) -> list[tuple[str, Array, float, float, bool]]:
        low, high = (5.0, 200.0) if use_budget else (30.0, 250.0)
        out = []
        for i, b in enumerate(plan(cfg.calls, low, high, seed=3)):
            name = cases[i % len(cases)].name  # the bundled GBDT (logit) serves its own rows
            timeout = b / 1e3 + 0.05 if use_budget else b / 1e3
            out.append((name, rows[name][i % 2], b, timeout, use_budget))
        return out

    lines = ["### 5. Budget adherence through the gRPC server (target: p99 <= 1.0 serially, "
             "<= 1.1 with 4 clients; no DEADLINE_EXCEEDED)", "",
             f"{cfg.calls} Explain calls per scenario, budgets log-uniform in 5-200 ms, "
             "cycling over the three models (`auto`), server in its own process (4 workers, "
             "one onnxruntime thread per session), clients on the same 2 cores. *wall* = the "
             "client's round trip, *server* = the response's cost.elapsed_ms; each / budget. "
             "With `budget_ms` the client's deadline is budget + 50 ms; *deadline only* sends "
             "no budget and a deadline drawn in 30-250 ms (the server keeps max(25 ms, 5%) of it "
             "as margin); there *wall / deadline* and *server / deadline* are shown.", "",
             "| scenario | clients | wall p50 | wall p99 | wall p99, < 20 ms | wall p99, >= 20 ms"
             " | server p50 | server p99 | DEADLINE_EXCEEDED | other errors |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    with server(_models.repository()) as port:
        for label, use_budget in (("budget_ms", True), ("deadline only", False)):
            for clients in (1, 4):
                calls = run_calls(port, jobs(use_budget), clients)
                lines.append(_adherence_row(label, clients, calls))
                _score_adherence(label, clients, calls, score)
    return "\n".join(lines)


def _score_adherence(label: str, clients: int, calls: list[Call], score: Score) -> None:
    ok = [c for c in calls if c.code == "OK"]
    wall = np.array([c.wall_ms / (c.budget_ms if label == "budget_ms" else 1e3 * c.timeout_s)
                     for c in ok])
    limit = 1.0 if clients == 1 else 1.1
    p99 = float(np.percentile(wall, 99))
    late = sum(c.code == "DEADLINE_EXCEEDED" for c in calls)
    score += [(f"5. p99 wall / {'budget' if label == 'budget_ms' else 'deadline'}, {label}, "
               f"{clients} client{'s' if clients > 1 else ''}", f"<= {limit}", f"{p99:.2f}",
               p99 <= limit),
              (f"5. DEADLINE_EXCEEDED, {label}, {clients} client{'s' if clients > 1 else ''}",
               "0", str(late), late == 0)]


def _adherence_row(label: str, clients: int, calls: list[Call]) -> str:
    ok = [c for c in calls if c.code == "OK"]
    denominator = np.array([c.budget_ms if label == "budget_ms" else 1e3 * c.timeout_s
                            for c in ok])
    wall = np.array([c.wall_ms for c in ok]) / denominator
    srv = np.array([c.server_ms for c in ok]) / denominator
    small = denominator < 20
    late = sum(c.code == "DEADLINE_EXCEEDED" for c in calls)
    other = sorted({c.code for c in calls} - {"OK", "DEADLINE_EXCEEDED"})
    others = sum(c.code in other for c in calls)
    q = np.percentile
    return (f"| {label} | {clients} | {q(wall, 50):.2f} | **{q(wall, 99):.2f}** | "
            f"{_p99(wall[small])} | {_p99(wall[~small])} | "
            f"{q(srv, 50):.2f} | {q(srv, 99):.2f} | {late} | "
            f"{others}{' (' + ', '.join(other) + ')' if other else ''} |")
