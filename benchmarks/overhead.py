"""Overhead over the onnxruntime floor (issues 3 and 17): the permutation sampler's wall and CPU
time per explanation against the time onnxruntime's session.run needs for the very batches it
evaluated, with today's row builder and the one before it, side by side in one run; masking
inside onnxruntime (a subgraph prepended to a copy of the model) measured against both; and
where the time goes now.

Models: the three of the Shapley section (benchmarks/_models.py) and the cheap ones of issue 17
(benchmarks/_heldout.py). The builder before is kept below verbatim (path-major rows), swapped
in for the "before" runs.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from benchmarks import _heldout, _models
from benchmarks._models import Case
from explainers import masking
from explainers.base import Array, Budget, Evaluator, ModelFn
from explainers.groups import Groups
from explainers.shapley import permutation
from explainers.shapley.permutation import PermutationShapley

TARGET = 1.15
EVALUATIONS = 100_000


@dataclass(frozen=True)
class Config:
    rows: int  # explained rows per model and repeat
    repeats: int  # interleaved before / after / floor rounds (the fastest is reported)
    cell_repeats: int  # timings per builder measurement (the fastest counts)


FULL = Config(rows=3, repeats=7, cell_repeats=30)
QUICK = Config(rows=1, repeats=2, cell_repeats=5)


def run(quick: bool) -> str:
    cfg = QUICK if quick else FULL
    cases = [*_models.cases(cfg.rows, cfg.rows),
             *(_heldout.case(name, cfg.rows) for name in _heldout.SPECS)]
    rows = [_overhead(c, cfg) for c in cases]
    parts = [_intro(), _targets(rows), _table(rows), _in_graph(cases, cfg),
             _builders(cfg), _orders(cases, cfg), _split(rows), WHY]
    return "\n\n".join(parts)


# --- the builder before (explainers/masking.py at ba4f926), verbatim -------------------------
def path_rows_before(x: Array, Z: Array, ranks: Array, dtype: type,
                     players: int | None = None) -> Array:
    """Path-major rows (paths, players - 1, elements), four passes broadcast along the steps."""
    d = x.size if players is None else players
    it = np.int32 if np.dtype(dtype).itemsize == 4 else np.int64
    xi: Array = x.astype(dtype).view(it)  # (features,)
    zi: Array = np.ascontiguousarray(Z, dtype=dtype).view(it)  # (paths, features)
    out = np.subtract(ranks.astype(it, copy=False)[:, None, :],
                      np.arange(1, d, dtype=it)[None, :, None])  # (paths, d - 1, elements)
    np.right_shift(out, 8 * np.dtype(it).itemsize - 1, out=out)
    np.bitwise_and(out, np.bitwise_xor(xi, zi)[:, None, :], out=out)
    np.bitwise_xor(out, zi[:, None, :], out=out)
    return np.asarray(out.view(dtype))


def path_values_before(ev: Evaluator, x: Array, Z: Array, ranks: Array,
                       groups: Groups | None = None) -> Array:
    d = ranks.shape[1]
    step = max(1, ev.chunk_rows // (d - 1))  # paths per model call
    ranks_e = ranks if groups is None else groups.expand_ranks(ranks)  # (paths, elements)
    parts = [ev(path_rows_before(x, Z[i:i + step], ranks_e[i:i + step], ev.dtype, d)
                .reshape(-1, x.size))
             for i in range(0, ranks.shape[0], step)]
    y = parts[0] if len(parts) == 1 else np.concatenate(parts)
    return y.reshape(ranks.shape[0], d - 1, -1)


@contextlib.contextmanager
def builder_before() -> Iterator[None]:
    """The permutation sampler with the path-major builder, for the "before" columns."""
    now = permutation.path_values
    permutation.path_values = path_values_before  # type: ignore[assignment]
    try:
        yield
    finally:
        permutation.path_values = now


# --- 1. overhead, before and after -----------------------------------------------------------
@dataclass(frozen=True)
class Row:
    case: Case
    ns_per_row: float  # onnxruntime's own rate at load
    wall: dict[str, float]  # before / after / floor / adapter: ms per explanation (median)
    cpu: dict[str, float]
    rows_ms: float  # of "after": building the rows (ms per explanation)

    def ratio(self, which: str, clock: str = "wall") -> float:
        t = self.wall if clock == "wall" else self.cpu
        return t[which] / t["floor"]


def _overhead(case: Case, cfg: Config) -> Row:
    """Interleaved rounds of: before, after, the recorded batches replayed through plain
    session.run (the floor) and through the adapter; wall and thread CPU time of each."""
    f = case.fn()
    batches: list[Array] = []
    _explain(case, _recorder(f, batches), cfg.rows)
    walls: dict[str, list[float]] = {k: [] for k in ("before", "after", "floor", "adapter")}
    cpus: dict[str, list[float]] = {k: [] for k in walls}
    building: list[float] = []
    for _ in range(cfg.repeats):
        with builder_before():
            _clocked(lambda: _explain(case, f, cfg.rows), "before", walls, cpus)
        with _rows_timer(building):
            _clocked(lambda: _explain(case, f, cfg.rows), "after", walls, cpus)
        _clocked(lambda: [case.plain(X) for X in batches], "floor", walls, cpus)
        _clocked(lambda: [f(X) for X in batches], "adapter", walls, cpus)
    per = 1e3 / cfg.rows  # the fastest round of each: on a shared machine noise only adds
    fastest = int(np.argmin(cpus["after"]))  # the rows' share: from that same round
    return Row(case, 1e9 / case.model.rows_per_second,
               {k: per * min(v) for k, v in walls.items()},
               {k: per * min(v) for k, v in cpus.items()}, per * building[fastest])


def _explain(case: Case, f: ModelFn, rows: int) -> None:
    for i, x in enumerate(case.X[:rows]):
        PermutationShapley().explain(case.evaluator(f), x, case.background,
                                     Budget(np.inf, EVALUATIONS), np.random.default_rng(i))


def _clocked(fn: Callable[[], object], key: str, walls: dict[str, list[float]],
             cpus: dict[str, list[float]]) -> None:
    wall, cpu = time.perf_counter(), time.thread_time()
    fn()
    cpus[key].append(time.thread_time() - cpu)
    walls[key].append(time.perf_counter() - wall)


@contextlib.contextmanager
def _rows_timer(total: list[float]) -> Iterator[None]:
    """Thread time spent in masking.path_rows while the block runs, appended to `total`."""
    inner, spent = masking.path_rows, [0.0]

    def timed(*args: object, **kwargs: object) -> Array:
        start = time.thread_time()
        out = inner(*args, **kwargs)  # type: ignore[arg-type]
        spent[0] += time.thread_time() - start
        return out

    masking.path_rows = timed  # type: ignore[assignment]
    try:
        yield
    finally:
        masking.path_rows = inner
        total.append(spent[0])


def _recorder(f: ModelFn, batches: list[Array]) -> ModelFn:
    def g(X: Array) -> Array:
        batches.append(np.ascontiguousarray(X, np.float32))
        return f(X)

    return g


def _intro() -> str:
    return ("## Overhead over the onnxruntime floor (issues 3 and 17)\n\n"
            "Sidelight's time per explanation (permutation sampler, 100,000 model rows, no "
            "deadline) / the time onnxruntime's `session.run` takes for the very batches it "
            "evaluated, replayed in the same chunks (*floor*). *before* = the path-major row "
            "builder of ba4f926, *after* = today's (explainers/masking.py: step-major rows; "
            "tree ensembles keep path-major rows, see the rows' order below, so for them the "
            "two differ only by noise); "
            "both runs, the floor and *adapter* (the same batches through the service's model "
            "function: float32 feed, float64 output, column, scale) are interleaved in one "
            "process, and the fastest of the rounds counts for each (on a shared machine noise "
            "only adds time). Wall time is what the issue measured; thread CPU time is the same "
            "ratio without the other tenants of this shared 2-core machine (its wall ratios "
            "moved by up to 0.4 between runs, the CPU ones by about 0.1). Only the builder "
            "differs between *before* and *after* (the adapter's own changes are in both). "
            "Attributions are bit for bit the same before and after (tests/test_masking.py).")


def _targets(rows: list[Row]) -> str:
    def line(r: Row) -> str:
        after = r.ratio("after", "cpu")
        return (f"| {r.case.label} | {r.ratio('before', 'cpu'):.2f} | **{after:.2f}** | "
                f"{r.ratio('before'):.2f} | {r.ratio('after'):.2f} | "
                f"{'met' if after <= TARGET else '**missed**'} |")

    return _markdown([f"### Target: <= {TARGET} on every model at 100,000 evaluations",
                      "Judged on thread CPU time (wall-clock ratios on this shared machine carry "
                      "the other tenants' load; both are in the next table)."],
                     ["model", "before", "after", "wall: before", "wall: after", ""],
                     [line(r) for r in rows])


def _table(rows: list[Row]) -> str:
    def line(r: Row) -> str:
        w = r.wall
        return (f"| {r.case.label} | {r.ns_per_row:.0f} | {w['before']:.1f} | "
                f"{w['after']:.1f} | {w['floor']:.1f} | {w['adapter']:.1f} | "
                f"{r.ratio('before'):.2f} | **{r.ratio('after'):.2f}** | "
                f"{r.ratio('before', 'cpu'):.2f} | **{r.ratio('after', 'cpu'):.2f}** |")

    return _markdown(["### Times per explanation"],
                     ["model", "onnxruntime ns/row", "before ms", "after ms", "floor ms",
                      "adapter ms", "before / floor", "after / floor", "CPU: before / floor",
                      "CPU: after / floor"], [line(r) for r in rows])


def _split(rows: list[Row]) -> str:
    """Where the CPU time of an explanation goes now, per model row."""
    def line(r: Row) -> str:
        per = 1e6 / EVALUATIONS  # ms per explanation -> ns per row
        ort_ns, total = r.cpu["floor"] * per, r.cpu["after"] * per
        adapter = max(r.cpu["adapter"] - r.cpu["floor"], 0.0) * per
        build = r.rows_ms * per
        rest = max(total - ort_ns - adapter - build, 0.0)
        return (f"| {r.case.label} | {r.case.d} | {ort_ns:.0f} | {adapter:.0f} | "
                f"{build:.0f} | {rest:.0f} | {total:.0f} |")

    return _markdown(["### Where the time goes now (thread CPU, ns per model row, after)",
                      "*onnxruntime* = the floor; *adapter* = the service's model function "
                      "beyond it; *rows* = building the masked rows; *sampler* = the rest "
                      "(random orders and background rows, path bookkeeping, marginals, per-row "
                      "sums, the estimate)."],
                     ["model", "features", "onnxruntime", "adapter", "rows", "sampler",
                      "total"], [line(r) for r in rows])


def _markdown(paragraphs: list[str], columns: list[str], lines: list[str]) -> str:
    """A heading and paragraphs, then a table with these columns and pre-formatted lines."""
    head = "|" + "|".join(f" {c} " if c else " " for c in columns) + "|"
    return "\n\n".join([*paragraphs, "\n".join([head, "|---" * len(columns) + "|", *lines])])


# --- 2. masking inside onnxruntime -----------------------------------------------------------
IN_GRAPH = ("breast_cancer_mlp", "friedman50_mlp", "digits_mlp", "interactions12_mlp")


def masked_model(proto: onnx.ModelProto, output: str, d: int) -> onnx.ModelProto:
    """A copy of the model whose rows onnxruntime builds itself from x [d], the paths'
    background rows Z [paths, 1, d] and the features' ranks R [paths, 1, d]: the mask of step
    k is Less(R, k + 1) (a broadcast to [paths, d - 1, d]) and the rows Where(mask, x, Z),
    reshaped to [paths * (d - 1), d] and fed to the original graph, pruned to `output`."""
    graph = proto.graph
    first = graph.input[0].name
    nodes = [helper.make_node("Less", ["mask_R", "mask_K"], ["mask_M"]),
             helper.make_node("Where", ["mask_M", "mask_x", "mask_Z"], ["mask_rows"]),
             helper.make_node("Reshape", ["mask_rows", "mask_shape"], [first])]
    inits = [numpy_helper.from_array(np.arange(1, d, dtype=np.int32)[:, None], "mask_K"),
             numpy_helper.from_array(np.array([-1, d], np.int64), "mask_shape")]
    inputs = [helper.make_tensor_value_info("mask_x", TensorProto.FLOAT, [d]),
              helper.make_tensor_value_info("mask_Z", TensorProto.FLOAT, ["P", 1, d]),
              helper.make_tensor_value_info("mask_R", TensorProto.INT32, ["P", 1, d])]
    new = helper.make_graph([*nodes, *graph.node], f"{graph.name}_masked", inputs,
                            [o for o in graph.output if o.name == output],
                            [*graph.initializer, *inits])
    model = helper.make_model(new, opset_imports=proto.opset_import)
    model.ir_version = proto.ir_version
    return model


def _session(proto: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.log_severity_level = 1, 4
    return ort.InferenceSession(proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _in_graph(cases: list[Case], cfg: Config) -> str:
    table = _markdown(
        ["### Masking inside onnxruntime (issue 17's proposal): measured, not adopted",
         "One model call's worth of permutation paths (the evaluator's chunk / (d - 1) paths), "
         "thread CPU ns per model row, the fastest of the repeats: the rows built in numpy "
         "(path-major *before*, step-major *after*) then `session.run`, against a copy of the "
         "model with a masking subgraph in front (`Less` of the ranks against the step, `Where` "
         "between x and the background row, `Reshape`), fed O(d) per path and pruned to the "
         "explained output (which alone saves 1-7% on the classifiers' label branch). The "
         "outputs of all three are equal bit for bit (*equal*)."],
        ["model", "paths", "numpy before + run", "numpy after + run", "in onnxruntime",
         "in onnxruntime / after", "equal"],
        [_in_graph_row(c, cfg) for c in cases if c.name in IN_GRAPH])
    return "\n\n".join([table, _op_costs(cfg)])


def _in_graph_row(case: Case, cfg: Config) -> str:
    d, model = case.d, case.model
    plain, masked = model.session, _session(masked_model(model.proto, case.output, d))
    rng = np.random.default_rng(0)
    paths = max(1, model.chunk_rows // (d - 1))
    x = case.X[0].astype(np.float32)
    Z = case.background.data[rng.integers(0, case.background.rows, paths)].astype(np.float32)
    R = np.argsort(rng.random((paths, d)), axis=1).astype(np.int32)
    name = model.inputs[0].name

    def before() -> Array:
        rows = path_rows_before(x, Z, R, np.float32, d).reshape(-1, d)
        return np.asarray(plain.run([case.output], {name: rows})[0])

    def after() -> Array:
        rows = masking.path_rows(x, Z, R, np.float32, d).reshape(-1, d)
        y = np.asarray(plain.run([case.output], {name: rows})[0])
        return y.reshape(d - 1, paths, -1).transpose(1, 0, 2).reshape(len(rows), -1)

    def inside() -> Array:
        feeds = {"mask_x": x, "mask_Z": Z[:, None], "mask_R": R[:, None]}
        return np.asarray(masked.run([case.output], feeds)[0])

    equal = np.array_equal(before(), after()) and np.array_equal(before(), inside())
    n = paths * (d - 1)
    t = {k: 1e9 * _fastest(fn, cfg.cell_repeats) / n
         for k, fn in (("before", before), ("after", after), ("inside", inside))}
    return (f"| {case.label} | {paths} | {t['before']:.0f} | {t['after']:.0f} | "
            f"{t['inside']:.0f} | **{t['inside'] / t['after']:.2f}** | {equal} |")


def _op_costs(cfg: Config) -> str:
    """The two ops per cell, alone, against the numpy builders (30 features, 4,096 rows)."""
    d, paths = 30, 4096 // 29
    rng = np.random.default_rng(0)
    x = rng.normal(size=d).astype(np.float32)
    Z = rng.normal(size=(paths, d)).astype(np.float32)
    R = np.argsort(rng.random((paths, d)), axis=1).astype(np.int32)
    less = _op_session("Less", [("R", TensorProto.INT32, ["P", 1, d])], TensorProto.BOOL,
                       numpy_helper.from_array(np.arange(1, d, dtype=np.int32)[:, None], "K"))
    M = np.asarray(less.run(None, {"R": R[:, None]})[0])
    where = _op_session("Where", [("M", TensorProto.BOOL, ["P", d - 1, d]),
                                  ("x", TensorProto.FLOAT, [d]),
                                  ("Z", TensorProto.FLOAT, ["P", 1, d])], TensorProto.FLOAT)
    cells = paths * (d - 1) * d
    t = {k: 1e9 * _fastest(fn, cfg.cell_repeats) / cells for k, fn in (
        ("less", lambda: less.run(None, {"R": R[:, None]})),
        ("where", lambda: where.run(None, {"M": M, "x": x, "Z": Z[:, None]})),
        ("before", lambda: path_rows_before(x, Z, R, np.float32, d)),
        ("after", lambda: masking.path_rows(x, Z, R, np.float32, d)))}
    return (f"Per cell of the rows (30 features, {paths * (d - 1):,} rows, thread CPU): "
            f"onnxruntime's `Less` {t['less']:.2f} ns and `Where` {t['where']:.2f} ns, against "
            f"{t['before']:.2f} ns for the whole numpy builder before and {t['after']:.2f} ns "
            "after.")


def _op_session(op: str, inputs: list[tuple[str, int, list[object]]], out: int,
                init: onnx.TensorProto | None = None) -> ort.InferenceSession:
    names = [name for name, _, _ in inputs] + ([init.name] if init is not None else [])
    graph = helper.make_graph(
        [helper.make_node(op, names, ["out"])], op,
        [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
        [helper.make_tensor_value_info("out", out, None)],
        [init] if init is not None else [])
    return _session(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _fastest(fn: Callable[[], object], repeats: int) -> float:
    fn()
    best = np.inf
    for _ in range(repeats):
        start = time.thread_time()
        fn()
        best = min(best, time.thread_time() - start)
    return float(best)


# --- 3. the rows' order -----------------------------------------------------------------------
def _orders(cases: list[Case], cfg: Config) -> str:
    return _markdown(
        ["### The rows' order and the model",
         "onnxruntime's thread CPU ns per row on the same rows (one 4,096-row chunk of "
         "permutation paths), fed path-major (a path's rows one after the other, each differing "
         "from the last in one feature) or step-major (consecutive rows from different paths); "
         "fastest of the repeats. Tree ensembles are fed path-major (the service tells the "
         "evaluator, `OnnxModel.has_trees`), the others step-major."],
        ["model", "path-major", "step-major", "step / path"],
        [_order_row(c, cfg.cell_repeats) for c in cases])


def _order_row(case: Case, repeats: int) -> str:
    d, rng = case.d, np.random.default_rng(0)
    paths = 4096 // (d - 1)
    Z = case.background.data[rng.integers(0, case.background.rows, paths)]
    R = np.argsort(rng.random((paths, d)), axis=1).astype(np.int32)
    by_path = masking.path_rows(case.X[0], Z, R, np.float32, d, True).reshape(-1, d)
    by_step = masking.path_rows(case.X[0], Z, R, np.float32, d).reshape(-1, d)
    a = 1e9 * _fastest(lambda: case.plain(by_path), repeats) / len(by_path)
    b = 1e9 * _fastest(lambda: case.plain(by_step), repeats) / len(by_step)
    return f"| {case.label} | {a:.0f} | {b:.0f} | {b / a:.2f} |"


# --- 4. builders per cell --------------------------------------------------------------------
def _builders(cfg: Config) -> str:
    rng = np.random.default_rng(0)
    return _markdown(
        ["### Building masked rows, ns per cell (thread CPU, fastest of the repeats)",
         "*Path rows* (permutation): one model chunk of paths (4,096 rows; 16,384 at 12 "
         "features), path-major before and step-major after. *Coalition rows* (kernel, every "
         "background row per coalition): 40 coalitions x 100 background rows, `np.where` before "
         "and the bitwise `select` after."],
        ["features", "path rows before", "path rows after", "speed-up", "coalition rows before",
         "coalition rows after", "speed-up"],
        [_builder_row(d, rng, cfg.cell_repeats) for d in (12, 30, 50, 64, 100)])


def _builder_row(d: int, rng: np.random.Generator, repeats: int) -> str:
    paths = (16384 if d == 12 else 4096) // (d - 1)
    x, Z = rng.normal(size=d), rng.normal(size=(paths, d))
    R = np.argsort(rng.random((paths, d)), axis=1).astype(np.int32)
    pb = _fastest(lambda: path_rows_before(x, Z, R, np.float32, d), repeats)
    pa = _fastest(lambda: masking.path_rows(x, Z, R, np.float32, d), repeats)
    m, bg = rng.random((40, 1, d)) < 0.5, rng.normal(size=(1, 100, d)).astype(np.float32)
    xf = x.astype(np.float32)
    cb = _fastest(lambda: np.where(m, xf, bg), repeats)
    ca = _fastest(lambda: masking.select(m, x, bg, np.float32), repeats)
    cells, cc = paths * (d - 1) * d, 40 * 100 * d
    return (f"| {d} | {1e9 * pb / cells:.2f} | {1e9 * pa / cells:.2f} | {pb / pa:.1f}x | "
            f"{1e9 * cb / cc:.2f} | {1e9 * ca / cc:.2f} | {cb / ca:.1f}x |")


WHY = """Why (mechanisms):

- *Masking inside onnxruntime loses*, so it is not integrated: onnxruntime's `Where` costs
  ~4.7 ns per cell (a generic element-by-element loop, about as slow without broadcasting)
  and `Less` ~0.6 ns, against ~0.4 ns per cell for the whole step-major numpy builder (1.1 ns
  before), so the masked copy of the model costs 1.5-3.5x more per row than building the rows
  in numpy and running the plain model, most on the cheapest model. Sending O(d) per path
  instead of O(d^2) saves nothing measurable: the numpy rows are built in cache either way.
  Identical attributions rule out the cheaper algebra (a first layer updated one feature at a
  time rounds differently in float32).
- *What was done instead*: the builder's four numpy passes (subtract, shift, and, xor on the
  floats' integer view) broadcast the step along one row of elements at a time, so every inner
  loop was d elements long. Built step-major ([step, path, element]) each pass runs over whole
  [path, element] planes and only the model's outputs are transposed back: 2.2-4.1x fewer ns per
  cell, most at few features. The kernel's coalition rows use the same bitwise select instead
  of `np.where` (1.5-2.2x). Tree ensembles run 1.4-1.5x slower on step-major rows (consecutive
  rows from different paths defeat the branch predictor), so the service marks them
  (`OnnxModel.has_trees`) and they keep path-major rows; MLPs do not care. Same rows, same
  model calls, the same attributions bit for bit. The model call's batch size is now chosen
  counting the caller's ~40 us per call, and the adapter's layout offsets are computed once.
- *Two fixes of 2026-12-02*: the ranks of a game with dummy players (digits: 53 live pixels of
  64) came out of `Groups.expand_ranks` in column order (`a[:, index]`), numpy laid the rows out
  the same way and every pass of the builder ran strided: 107 -> 21 ns per row on digits, ratio
  2.66 -> 1.45 (`np.take` and a C-order copy in `path_rows` now). And this process now runs
  one BLAS thread (benchmarks/__init__.py): with two, OpenBLAS's threads spun on after the
  sampler's products and slowed the floor replayed right after them, so earlier runs of this
  section overstated the floor and understated the ratios (digits 1.44 then, against 2.66
  before the layout fix with one thread).
- *Misses*: 1.15 leaves everything but the model 15% of the model's time: ~3 ns per row on
  the 12-feature MLP (19 ns per row in onnxruntime), ~14 on digits, ~15 on the Friedman MLP,
  ~22-26 on the 100- and 30-feature MLPs. The random orders alone (`rng.permuted`, ~7 ns per
  row, part of the seed's stream) exceed the first; the sampler's own per-row numpy work in
  explainers/shapley/permutation.py (path array, marginals by `np.diff` + `take_along_axis`,
  pair means, per-row sums: 7-40 ns per row, the last table) the others, with the rows
  (0.3-0.4 ns per cell in place) and the adapter (float64 output, column, logit: 1-6 ns).
  Marginals by flat indexing measured 6 -> 3.5 ns per row; a compiled (numba, branch-free)
  builder 0.15-0.5 ns per cell, 10-20 ns per row less at 50-100 features: neither closes the
  gap, which needs the sampler's per-row bookkeeping fused (compiled) or the model's cost per
  row to be larger. The tree models (~0.7 us per row) meet the target (1.10)."""
