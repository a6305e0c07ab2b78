"""Honest admission (issue 17): no accepted call over 1.05x its budget, for `exact` and for the
first calls on a newly uploaded background, one client, through the gRPC server.

`sidelight` runs in its own process (result cache off) on the held-out models of the
heldout_accuracy section. *exact*: `method: exact` on the 12-feature MLP with interactions
(4,094 coalitions x 100 background rows = 409,401 model rows a row), at budgets from half its
measured cost to three times it, the budgets interleaved round by round. Its measured cost is
the median server time of a few calls with a large budget; the server's own estimate is read
off its refusals ("~N ms here") and off a 1 ms probe before each round. *first calls*: a fresh
background (100 rows drawn anew from the model's rows: new content, new sha256) stored with
PutBackground, then at once an Explain against it (the first call: f(background), the affine
probe of `auto`, the trees' tables and deep leaves' patterns unless the fit started by the
upload is done), then a second identical Explain (the same call warm), then DeleteBackground.
*wall* = the client's round trip, *server* = the response's cost.elapsed_ms; each / budget.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np

from benchmarks._models import CACHE
from benchmarks._server import server
from benchmarks.heldout_accuracy import REPO, _bg, _entry, _function, _onnx
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

OVER = 1.05
T = TypeVar("T")
EXACT_MODEL = "interactions12_mlp"
EXACT_FACTORS = (0.5, 0.75, 1.0, 1.1, 1.2, 1.3, 1.4, 1.6, 2.0, 3.0)  # budgets / measured cost
ESTIMATE = re.compile(r"~(\d+) ms here")
MODELS = ("lightgbm_defaults", "digits_mlp", "interactions12_mlp")
ADMISSION_REPO = CACHE / "admission_repo"
UPLOADS = 1000  # the server's per-client upload limit here (default 100 an hour)
FIT_WAIT_S = 2.5  # "after the fit": the wait between the upload and the first call


@dataclass(frozen=True)
class Scenario:
    """A first call: model, method, budget, target, and how long after the upload it comes."""

    model: str
    method: str
    budget_ms: float
    scale: str = "identity"  # "" and column None: the model's default target
    column: int | None = 0
    wait_s: float = 0.0


# the first call builds per-background state: f(background), auto's affine probe, tree tables
FIRST_CALLS = (Scenario("lightgbm_defaults", "tree", 20.0, "logit", 1),
               Scenario("lightgbm_defaults", "tree", 50.0, "logit", 1),
               Scenario("lightgbm_defaults", "auto", 20.0, "logit", 1),
               Scenario("lightgbm_defaults", "auto", 50.0, "logit", 1),
               Scenario("digits_mlp", "permutation", 20.0, "identity", 3),
               Scenario("digits_mlp", "auto", 20.0, "identity", 3),
               Scenario("interactions12_mlp", "auto", 50.0),
               Scenario("lightgbm_defaults", "tree", 20.0, "logit", 1, FIT_WAIT_S),
               Scenario("lightgbm_defaults", "auto", 20.0, "logit", 1, FIT_WAIT_S),
               Scenario("digits_mlp", "permutation", 20.0, "identity", 3, FIT_WAIT_S),
               Scenario("lightgbm_defaults", "tree", 20.0, "", None),
               Scenario("lightgbm_defaults", "tree", 20.0, "", None, FIT_WAIT_S))


@dataclass(frozen=True)
class Config:
    exact_rounds: int  # calls per exact budget
    first_reps: int  # fresh backgrounds per first-call scenario


FULL = Config(exact_rounds=20, first_reps=10)
QUICK = Config(exact_rounds=3, first_reps=2)


@dataclass(frozen=True)
class Outcome:
    budget_ms: float
    code: str
    wall_ms: float
    server_ms: float = float("nan")
    method: str = ""
    notes: tuple[str, ...] = ()
    estimate_ms: float = float("nan")  # the server's estimate, when it said one

    @property
    def accepted(self) -> bool:
        return self.code == "OK"

    def over(self, server_side: bool = False) -> bool:
        value = self.server_ms if server_side else self.wall_ms
        return self.accepted and value > OVER * self.budget_ms


def run(quick: bool) -> str:
    """Full: a fresh server for the exact calls, for each first-call scenario (what one
    scenario leaves in the server, e.g. a measured reserve, does not reach the next) and for
    the carry-over sequence. Quick: one server for everything."""
    cfg = QUICK if quick else FULL
    repo = _repo()
    fit = _fit_in_process(2 if quick else 4)
    with _uploads_allowed(UPLOADS):
        if quick:
            exact, first, carry = _on_server(repo, lambda stub: _everything(stub, cfg))
        else:
            exact = _on_server(repo, lambda stub: _exact(stub, cfg))
            first = {s: _on_server(repo, lambda stub, s=s: _first_calls(stub, s,
                                                                       cfg.first_reps))
                     for s in FIRST_CALLS}
            carry = _on_server(repo, lambda stub: _carry_over(stub, cfg.first_reps))
    return _report(exact, first, carry, fit, cfg, quick)


def _on_server(repo: Path, work: Callable[[pb_grpc.ExplainerStub], T]) -> T:
    """`work` against a server of its own, stopped after it."""
    with server(repo) as port, grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return work(pb_grpc.ExplainerStub(channel))


def _everything(stub: pb_grpc.ExplainerStub, cfg: Config) -> tuple[Exact, dict[Scenario, First],
                                                                   dict[str, list[Outcome]]]:
    """Quick mode on one server: the waits after an upload once per scenario."""
    exact = _exact(stub, cfg)
    first = {s: _first_calls(stub, s, 1 if s.wait_s else cfg.first_reps) for s in FIRST_CALLS}
    return exact, first, _carry_over(stub, cfg.first_reps)


def _repo() -> Path:
    """A repository with the three models this section calls (a server starts faster)."""
    for name in MODELS:
        _entry(name)
        if not (ADMISSION_REPO / name / "1" / "model.onnx").exists():
            shutil.copytree(REPO / name, ADMISSION_REPO / name, dirs_exist_ok=True)
    return ADMISSION_REPO


@contextmanager
def _uploads_allowed(n: int) -> Iterator[None]:
    """The server child reads SIDELIGHT_UPLOADS_PER_CLIENT from the environment it inherits:
    this benchmark uploads more than the default 100 backgrounds an hour from one client."""
    key, old = "SIDELIGHT_UPLOADS_PER_CLIENT", os.environ.get("SIDELIGHT_UPLOADS_PER_CLIENT")
    os.environ[key] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = old


def _rows(name: str) -> np.ndarray:
    """Every row the model's entry holds: the explained ones and its default background."""
    return np.concatenate([np.load(REPO / name / "rows.npy"),
                           np.load(REPO / name / "background.npy")]).astype(np.float32)


def _explain(stub: pb_grpc.ExplainerStub, model: str, x: np.ndarray, method: str,
             budget_ms: float, seed: int, scale: str = "identity", column: int | None = 0,
             background: str = "") -> Outcome:
    request = pb.ExplainRequest(model=model, inputs=[from_array("input", x[None])],
                                method=method, budget_ms=budget_ms, seed=seed,
                                target=pb.Target(classes=[] if column is None else [column],
                                                 scale=scale),
                                background=background)
    start = time.perf_counter()
    try:
        r = stub.Explain(request, timeout=budget_ms / 1e3 + 5.0)
    except grpc.RpcError as err:
        wall = 1e3 * (time.perf_counter() - start)
        said = ESTIMATE.search(err.details() or "")
        return Outcome(budget_ms, err.code().name, wall,
                       estimate_ms=float(said.group(1)) if said else float("nan"),
                       notes=(err.details() or "",))
    wall = 1e3 * (time.perf_counter() - start)
    return Outcome(budget_ms, "OK", wall, r.cost.elapsed_ms, r.method, tuple(r.notes))


def _rate(stub: pb_grpc.ExplainerStub, model: str) -> float:
    return float(stub.GetModel(pb.GetModelRequest(model=model)).rows_per_second)


# --- exact ------------------------------------------------------------------------------------
@dataclass
class Exact:
    measured_ms: float = 0.0  # median server time with a large budget
    probes: list[float] = field(default_factory=list)  # the server's estimate, before rounds
    calls: list[Outcome] = field(default_factory=list)
    rounds: list[int] = field(default_factory=list)  # each call's round
    rates: list[float] = field(default_factory=list)  # GetModel rows/s: start, then per round
    local: dict[str, float] = field(default_factory=dict)  # the same work in this process


def _exact(stub: pb_grpc.ExplainerStub, cfg: Config) -> Exact:
    X = np.load(REPO / EXACT_MODEL / "rows.npy")
    out = Exact(rates=[_rate(stub, EXACT_MODEL)], local=_exact_in_process(X[:4]))
    warm = [_explain(stub, EXACT_MODEL, X[k], "exact", 2000.0, k + 1) for k in range(5)]
    out.measured_ms = statistics.median(o.server_ms for o in warm[1:])
    budgets = sorted({round(out.measured_ms * f) for f in EXACT_FACTORS})
    rng = np.random.default_rng(0)
    seed = 100
    for k in range(cfg.exact_rounds):
        out.probes.append(_explain(stub, EXACT_MODEL, X[0], "exact", 1.0, 1).estimate_ms)
        for b in rng.permutation(budgets):
            seed += 1
            out.calls.append(_explain(stub, EXACT_MODEL, X[seed % len(X)], "exact", float(b),
                                      seed))
            out.rounds.append(k)
        out.rates.append(_rate(stub, EXACT_MODEL))
    return out


def _exact_in_process(X: np.ndarray) -> dict[str, float]:
    """ExactShapley on the same function in this process: its wall time, the model time
    predicted at OnnxModel.measure's rows/s, and the rows/s its own model calls ran at."""
    from explainers.base import Background, Budget, Evaluator
    from explainers.shapley.exact import ExactShapley

    model = _onnx(EXACT_MODEL)
    f = _function(model, EXACT_MODEL, "identity", 0)
    data = _bg(EXACT_MODEL)
    bg = Background.build(data, f(data))
    walls, predicted, ran = [], [], []
    for x in X.astype(np.float64):
        ev = Evaluator(f, model.chunk_rows, model.rows_per_second, dtype=model.batch_dtype)
        predicted.append(ev.seconds_for(ExactShapley().expected_evaluations(x.size, bg) or 0))
        start = time.perf_counter()
        ExactShapley().explain(ev, x, bg, Budget(math.inf), np.random.default_rng(0))
        walls.append(time.perf_counter() - start)
        ran.append(ev.rows_per_second)
    return {"wall_ms": 1e3 * statistics.median(walls),
            "model_ms": 1e3 * statistics.median(predicted),
            "rate": model.rows_per_second, "ran": statistics.median(ran)}


# --- first calls on a new background ----------------------------------------------------------
@dataclass
class First:
    upload_ms: list[float] = field(default_factory=list)
    first: list[Outcome] = field(default_factory=list)
    second: list[Outcome] = field(default_factory=list)


def _first_calls(stub: pb_grpc.ExplainerStub, s: Scenario, reps: int) -> First:
    rows = _rows(s.model)
    rng = np.random.default_rng(abs(hash(s)) % 2**32)
    out = First()
    for k in range(reps):
        name = f"fresh-{s.method}-{s.budget_ms:g}-{k}-{time.time_ns()}"
        data = rows[rng.choice(len(rows), 100, replace=False)]
        start = time.perf_counter()
        stub.PutBackground(pb.PutBackgroundRequest(model=s.model, name=name,
                                                   data=from_array("data", data)))
        out.upload_ms.append(1e3 * (time.perf_counter() - start))
        time.sleep(s.wait_s)
        x = rows[rng.integers(len(rows))]
        for calls in (out.first, out.second):
            calls.append(_explain(stub, s.model, x, s.method, s.budget_ms, k + 1, s.scale,
                                  s.column, name))
        stub.DeleteBackground(pb.DeleteBackgroundRequest(model=s.model, name=name))
        time.sleep(0.05)
    return out


def _carry_over(stub: pb_grpc.ExplainerStub, reps: int) -> dict[str, list[Outcome]]:
    """One server: the digits MLP's permutation calls at 20 ms (default background), then
    first calls of `auto` on LightGBM right after uploads (a fit running), then the digits
    calls again: what the second phase leaves for the third."""
    digits = _rows("digits_mlp")
    lgbm = Scenario("lightgbm_defaults", "auto", 20.0, "logit", 1)

    def plain(seed: int) -> list[Outcome]:
        return [_explain(stub, "digits_mlp", digits[k], "permutation", 20.0, seed + k,
                         "identity", 3) for k in range(2 * reps)]

    before = plain(1)
    fits = _first_calls(stub, lgbm, reps)
    return {"digits permutation, before": before,
            "LightGBM auto, first calls (fit running)": fits.first + fits.second,
            "digits permutation, after": plain(1000)}


def _fit_in_process(backgrounds: int) -> dict[str, float]:
    """LightGBM's tables and patterns for fresh 100-row backgrounds in this process: the fit
    TreeShap predicts before it has fitted any, and the fit measured (medians)."""
    import onnx

    from explainers.base import Background
    from explainers.trees.onnx_trees import parse_onnx_trees, predict_margin
    from explainers.trees.tree import TreeShap

    parsed = parse_onnx_trees(onnx.load(REPO / "lightgbm_defaults" / "1" / "model.onnx"))
    rows, rng = _rows("lightgbm_defaults").astype(np.float64), np.random.default_rng(5)
    tree = TreeShap(parsed, [1])
    predicted, measured = [], []
    for _ in range(backgrounds):
        data = rows[rng.choice(len(rows), 100, replace=False)]
        bg = Background.build(data, predict_margin(parsed, data)[:, [1]])
        predicted.append(tree.fit_seconds(bg))
        start = time.perf_counter()
        tree.prefit(bg)
        measured.append(time.perf_counter() - start)
    return {"first_predicted_ms": 1e3 * predicted[0],
            "predicted_ms": 1e3 * statistics.median(predicted[1:] or predicted),
            "measured_ms": 1e3 * statistics.median(measured)}


# --- report -----------------------------------------------------------------------------------
def _report(exact: Exact, first: dict[Scenario, First], carry: dict[str, list[Outcome]],
            fit: dict[str, float], cfg: Config, quick: bool) -> str:
    load = os.getloadavg()
    lines = ["## Admission: accepted calls within their budget (issue 17)", "",
             __doc__.split("\n\n", 1)[1].strip().replace("\n", " "), "",
             f"Mode: {'quick (smoke test, one server for everything)' if quick else 'full'}: "
             f"{cfg.exact_rounds} calls per exact budget, {cfg.first_reps} fresh backgrounds "
             f"per first-call scenario{'' if quick else ', a server of its own for each'}; "
             f"SIDELIGHT_UPLOADS_PER_CLIENT={UPLOADS}; one client; load average "
             f"{load[0]:.2f} / {load[1]:.2f} at the end (2 cores, other "
             "work running).", ""]
    lines += [*_targets(exact, first), "", *_exact_table(exact), ""]
    lines += [*_first_table(first, fit), "", *_carry_table(carry), "",
              _why(exact, first, carry, fit)]
    return "\n".join(lines) + "\n"


def _targets(exact: Exact, first: dict[Scenario, First]) -> list[str]:
    over_exact = sum(o.over() for o in exact.calls)
    accepted = sum(o.accepted for o in exact.calls)
    firsts = [o for s, f in first.items() if not s.wait_s for o in f.first]
    over_first = sum(o.over() for o in firsts)
    accepted_first = sum(o.accepted for o in firsts)
    return ["### Targets", "", "| target | reached | |", "|---|---|---|",
            f"| `exact`: 0 accepted calls over {OVER}x budget (client wall) | {over_exact} of "
            f"{accepted} accepted | {_met(over_exact == 0)} |",
            f"| first call right after a background upload: 0 accepted calls over {OVER}x "
            f"budget (client wall) | {over_first} of {accepted_first} accepted | "
            f"{_met(over_first == 0)} |"]


def _met(ok: bool) -> str:
    return "met" if ok else "**missed**"


def _exact_table(exact: Exact) -> list[str]:
    probes = [p for p in exact.probes if p == p]
    local = exact.local
    lines = ["### `exact` on the 12-feature MLP", "",
             f"Measured cost: **{exact.measured_ms:.1f} ms** of server time (median of 4 calls "
             f"with a 2 s budget); in this process the same enumeration takes "
             f"{local['wall_ms']:.1f} ms ({local['model_ms']:.1f} ms of model time predicted "
             f"at OnnxModel.measure's {local['rate'] / 1e6:.1f}M rows/s; its model calls ran at "
             f"{local['ran'] / 1e6:.1f}M rows/s). The server's estimate (1 ms probes before "
             f"each round): {_range(probes)} ms. The model's rows/s as GetModel reports it: "
             f"{exact.rates[0] / 1e6:,.0f}M at the start, {_range(exact.rates[1:], 1e-6)}M "
             f"after each round. *over* = accepted calls whose time exceeds {OVER}x the "
             "budget.", "",
             "| budget ms | budget / cost | calls | accepted | refused | over (wall) | "
             "over (server) | wall / budget p50, max | server ms p50, max | estimate in "
             "refusals |", "|---|---|---|---|---|---|---|---|---|---|"]
    for b in sorted({o.budget_ms for o in exact.calls}):
        calls = [o for o in exact.calls if o.budget_ms == b]
        ok = [o for o in calls if o.accepted]
        refused = [o for o in calls if o.code == "RESOURCE_EXHAUSTED"]
        other = len(calls) - len(ok) - len(refused)
        lines.append(
            f"| {b:g} | {b / exact.measured_ms:.2f} | {len(calls)} | {len(ok)} | "
            f"{len(refused)}{f' (+{other} other)' if other else ''} | "
            f"{sum(o.over() for o in ok)} | {sum(o.over(True) for o in ok)} | "
            f"{_pair([o.wall_ms / b for o in ok], '.2f')} | "
            f"{_pair([o.server_ms for o in ok], '.1f')} | "
            f"{_range([o.estimate_ms for o in refused if o.estimate_ms == o.estimate_ms])} |")
    return lines


def _first_table(first: dict[Scenario, First], fit: dict[str, float]) -> list[str]:
    lines = ["### First calls on a new background", "",
             "Per scenario: the upload's round trip, then the first and the second call "
             "against the new background, at once or *after* a wait of "
             f"{FIT_WAIT_S:g} s (the fit the upload started is done by then): accepted / "
             f"refused, accepted over {OVER}x (client wall; server), wall / budget p50 and "
             "max, server / budget max, the client's wall less the server's elapsed (median), "
             "and what ran (the response's method and notes, abridged). LightGBM's tables and "
             "patterns for a fresh 100-row background, in this process: "
             f"{fit['measured_ms']:.0f} ms measured; TreeShap predicts "
             f"{fit['first_predicted_ms']:.0f} ms before its first fit and "
             f"{fit['predicted_ms']:.0f} ms after.", "",
             "| model | method | target | budget ms | when | upload ms | call | accepted | "
             "refused | over (wall; server) | wall / budget p50, max | server / budget max | "
             "wall - server ms | ran |", "|" + "---|" * 14]
    for s, f in first.items():
        for label, calls in (("first", f.first), ("second", f.second)):
            ok = [o for o in calls if o.accepted]
            refused = sum(o.code == "RESOURCE_EXHAUSTED" for o in calls)
            ran = sorted({o.method for o in ok} | {_short(o) for o in calls if _short(o)})
            srv = [o.server_ms / s.budget_ms for o in ok]
            gap = [o.wall_ms - o.server_ms for o in ok]
            lines.append(
                f"| {s.model} | {s.method} | {_target(s)} | {s.budget_ms:g} | "
                f"{f'after {s.wait_s:g} s' if s.wait_s else 'at once'} | "
                f"{statistics.median(f.upload_ms):.1f} | {label} | {len(ok)} | {refused} | "
                f"{sum(o.over() for o in ok)}; {sum(o.over(True) for o in ok)} | "
                f"{_pair([o.wall_ms / s.budget_ms for o in ok], '.2f')} | "
                f"{max(srv) if srv else float('nan'):.2f} | "
                f"{statistics.median(gap) if gap else float('nan'):.1f} | {'; '.join(ran)} |")
    return lines


def _target(s: Scenario) -> str:
    return "default" if s.column is None else f"{s.scale} of class {s.column}"


def _carry_table(carry: dict[str, list[Outcome]]) -> list[str]:
    lines = ["### What one scenario leaves for the next (one server)", "",
             "In one server, in this order: the digits MLP's `permutation` at 20 ms (default "
             "background), `auto` on LightGBM (logit of class 1) at 20 ms right after uploads "
             "(first and second calls, a fit running), then the digits calls again. *refusals* "
             "= the most common reason (numbers as N).", "",
             "| phase | calls | accepted | refused | over (wall; server) | wall / budget p50, "
             "max | refusals |", "|---|---|---|---|---|---|---|"]
    for phase, calls in carry.items():
        ok = [o for o in calls if o.accepted]
        lines.append(f"| {phase} | {len(calls)} | {len(ok)} | {len(calls) - len(ok)} | "
                     f"{sum(o.over() for o in ok)}; {sum(o.over(True) for o in ok)} | "
                     f"{_pair([o.wall_ms / o.budget_ms for o in ok], '.2f')} | "
                     f"{_reason(calls)} |")
    return lines


def _reason(calls: list[Outcome]) -> str:
    """The most common refusal message, numbers replaced by N, with its count."""
    found = Counter(re.sub(r"-?[\d.]+", "N", o.notes[0])[:120] for o in calls
                    if not o.accepted and o.notes)
    if not found:
        return "-"
    why, n = found.most_common(1)[0]
    return f"{n} x \"{why}\""


def _short(o: Outcome) -> str:
    """A note worth showing: a fallback, a build, a refusal; trimmed."""
    if not o.accepted and o.notes:
        return o.notes[0][:90] + ("..." if len(o.notes[0]) > 90 else "")
    for note in o.notes:
        if any(w in note for w in ("sampled instead", "fell back", "tree needs", "exact needs")):
            return note[:90] + ("..." if len(note) > 90 else "")
    return ""


def _pair(values: list[float], fmt: str) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):{fmt}}, {max(values):{fmt}}"


def _range(values: list[float], scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    if not values:
        return "-"
    low, high = f"{min(values):,.0f}", f"{max(values):,.0f}"
    return low if low == high else f"{low}-{high}"


def _why(exact: Exact, first: dict[Scenario, First], carry: dict[str, list[Outcome]],
         fit: dict[str, float]) -> str:
    """Each over-budget exact call with the estimate the server held then; the mechanisms with
    this run's figures."""
    lines = ["Accepted `exact` calls over the budget, with the server's estimate probed before "
             "their round and the model's rows/s (GetModel) at the start of that round:", "",
             "| round | budget ms | wall ms | server ms | estimate before the round, ms | "
             "server rows/s |", "|---|---|---|---|---|---|"]
    over = [(o, k) for o, k in zip(exact.calls, exact.rounds, strict=True)
            if o.over() or o.over(True)]
    for o, k in over:
        lines.append(f"| {k + 1} | {o.budget_ms:g} | {o.wall_ms:.1f} | {o.server_ms:.1f} | "
                     f"{exact.probes[k]:.0f} | {exact.rates[k] / 1e6:,.0f}M |")
    if not over:
        lines.append("| - | | | | | |")
    estimates = [exact.probes[k] for _, k in over if exact.probes[k] == exact.probes[k]]
    rates = [exact.rates[k] for _, k in over]
    lines += ["", "Mechanisms (measured):", "",
              (f"- *`exact` admitted on an estimate below its cost.* `exact` is admitted when its "
               "estimate (model rows / the model's rows/s x its learned wall factor) fits 0.8 "
               "of the time left after the response reserve. The calls above were admitted "
               f"while the estimate was {_range(estimates)} ms against a measured "
               f"{exact.measured_ms:.0f} ms, and the model's rows/s stood at "
               f"{_range(rates, 1e-6)}M against {exact.local['rate'] / 1e6:.0f}M measured in "
               "this process. " if over else
               "- *`exact`*: no accepted call over the budget; it is admitted when its estimate "
               "(model rows / the model's rows/s x its learned wall factor) fits 0.8 of the time "
               f"left after the response reserve, and its cost here is {exact.measured_ms:.0f} "
               "ms. ") + RATE, _sticky(exact),
              _fit_bullet(first, fit), _auto_bullet(first), _carry_bullet(carry), _non_tree(first)]
    return "\n".join(lines)


def _sticky(exact: Exact) -> str:
    """When one slow call lifted the learned estimate above the larger budgets: which call,
    and how many calls at >= 2x the cost were refused after it."""
    high = [k for k, p in enumerate(exact.probes) if p > 1.5 * exact.measured_ms]
    if not high:
        return ("- *The estimate after a slow call.* It stayed within 1.5x the measured cost "
                "through the run.")
    k = high[0]
    before = [o for o, r in zip(exact.calls, exact.rounds, strict=True)
              if r == k - 1 and o.accepted]
    slow = max(before, key=lambda o: o.server_ms, default=None)
    after = [o for o, r in zip(exact.calls, exact.rounds, strict=True)
             if r >= k and o.budget_ms >= 2 * exact.measured_ms]
    what = (f"a call of {slow.server_ms:.0f} ms (server) at a {slow.budget_ms:g} ms budget in "
            f"round {k}" if slow is not None else f"round {k}")
    refused = sum(not o.accepted for o in after)
    text = (f"- *The estimate after a slow call.* After {what}, the estimate rose to "
            f"{max(exact.probes[k:]):.0f} ms ({max(exact.probes[k:]) / exact.measured_ms:.1f}x "
            f"the measured cost); {refused} of {len(after)} later calls at 2-3x the cost were "
            "refused. The wall factor moves by FACTOR_WEIGHT (0.5) on each answered call and "
            "not at all on a refusal")
    if refused * 2 > len(after):
        return text + (": with only `exact` traffic on the model, once the estimate exceeds "
                       "the budgets sent, no call measures it again.")
    return text + "; calls at larger budgets still answered brought it back down."


def _find(first: dict[Scenario, First], model: str, method: str, default: bool,
          wait: bool) -> list[First]:
    return [f for s, f in first.items() if s.model == model and s.method == method
            and (s.column is None) == default and bool(s.wait_s) == wait]


def _fit_bullet(first: dict[Scenario, First], fit: dict[str, float]) -> str:
    other = [o for f in _find(first, "lightgbm_defaults", "tree", False, True) for o in f.first]
    default = [o for f in _find(first, "lightgbm_defaults", "tree", True, True) for o in f.first]
    soon = [o for f in _find(first, "lightgbm_defaults", "tree", True, False) for o in f.first]
    served = [o.wall_ms / o.budget_ms for o in default if o.accepted]
    return (f"- *`tree` and the upload's fit.* PutBackground fits the tables for the model's "
            "*default* target (here the logit of both columns) in a server thread. A request "
            "for another target, even the same scale on one of its columns (the logit of "
            "class 1, the usual way to ask for a binary classifier's log-odds), is served by "
            "another TreeShap, keyed by its columns, which finds no fit: "
            f"{sum(not o.accepted for o in other)} of {len(other)} such first calls "
            f"{FIT_WAIT_S:g} s after the upload were refused (RESOURCE_EXHAUSTED, up front, as "
            "the README says; each refusal starts a fit for the next request). With the "
            f"default target, {len(served)} of {len(default)} were answered by `tree` "
            f"(wall / budget median {statistics.median(served) if served else float('nan'):.2f}"
            f"); right after the upload {sum(not o.accepted for o in soon)} of {len(soon)} were "
            f"refused while the fit runs (in this process: {fit['measured_ms']:.0f} ms; the "
            f"server predicted {_range([_needs(o) for o in soon if _needs(o) == _needs(o)])} "
            "ms, learning it from fits timed while they share the GIL with calls).")


def _needs(o: Outcome) -> float:
    found = re.search(r"tree needs about (\d+) ms", " ".join(o.notes))
    return float(found.group(1)) if found else float("nan")


def _auto_bullet(first: dict[Scenario, First]) -> str:
    fitting = [o for f in _find(first, "lightgbm_defaults", "auto", False, False)
               for o in f.first + f.second if o.accepted]
    plain = [o for f in _find(first, "digits_mlp", "permutation", False, False)
             for o in f.first + f.second if o.accepted]

    def gap(calls: list[Outcome]) -> float:
        return statistics.median(o.wall_ms - o.server_ms for o in calls) if calls else math.nan

    return (f"- *`auto` while a fit runs.* `auto` on LightGBM (logit of class 1) samples while "
            f"a fit runs in a server thread: {sum(o.over() for o in fitting)} of {len(fitting)} "
            f"answers over {OVER}x the budget at the client, "
            f"{sum(o.over(True) for o in fitting)} in the server; the client's wall less the "
            f"server's elapsed is {gap(fitting):.1f} ms (median) against {gap(plain):.1f} ms "
            "for the digits MLP's permutation calls with no fit running. The fit thread holds "
            "the GIL in the server process: the sampler's rounds and the response's "
            "serialisation and send (after cost.elapsed_ms is stamped) wait for it, and "
            "Python hands the GIL over only every 5 ms (sys.getswitchinterval).")


def _carry_bullet(carry: dict[str, list[Outcome]]) -> str:
    before, _, after = carry.values()
    refused = [o for o in after if not o.accepted]
    return (f"- *A measured reserve that remembers.* The server keeps back, per load level and "
            "budget band, the 99th percentile of how far past their deadline the estimators "
            "ran and of the time after them (service/plane/reserve.py, window of 256 calls, "
            "all models together). The digits calls at 20 ms were accepted "
            f"{sum(o.accepted for o in before)} of {len(before)} times before the LightGBM "
            f"calls that overran while a fit ran, and {len(after) - len(refused)} of "
            f"{len(after)} after them ({_reason(after)}): one model's overruns widen the "
            "band's reserve for every model at that load level (its calls then stop earlier, "
            "or are refused before they compute, adding nothing to the window) until they are "
            "older than the reserve's 30 s horizon (HORIZON_S), when the band reopens.")


RATE = """Before this stop's fix, 3 of 84 accepted calls ran over 1.05x: `Evaluator._timed`
  (explainers/base.py) took any chunk of >= 64 rows that ran in under `call_overhead_s` (50 us)
  as rows / 1 ns (this 12-feature MLP runs 64-1,024 rows in 20-40 us), so the model's learned
  rows/s, which admission's least cost and `auto`'s choice read, swung to 10^10-10^12. Now at
  most half of a call's measured time is taken off for the overhead."""

def _non_tree(first: dict[Scenario, First]) -> str:
    """The digits MLP's first calls right after an upload against those 2.5 s later."""
    def median(wait: bool) -> str:
        calls = [o.wall_ms / o.budget_ms for f in _find(first, "digits_mlp", "permutation",
                                                        False, wait)
                 for o in f.first if o.accepted]
        return f"{statistics.median(calls):.2f}" if calls else "-"

    return ("- *Non-tree first calls* (f(background) and `auto`'s affine probe: 100 model rows "
            "and a few probes) cost little: the digits MLP's first `permutation` calls at 20 ms "
            f"take {median(False)} of the budget (median) right after the upload and "
            f"{median(True)} 2.5 s later.")
