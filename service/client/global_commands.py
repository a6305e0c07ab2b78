"""`sidelight global importance|dependence|shapley|projection|live`: the dataset-wide jobs from
the command line, over a file of rows (--input, as `sidelight explain` reads them) or a stored
dataset (--dataset), with progress on stderr, a table on stdout, --plot and --report."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from service.client import batch
from service.client import datasets as jobs
from service.client.client import CallError, Client
from service.client.wire import Array
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import explainer_pb2 as pb

HELP = """Dataset-wide explanations with a running server.

  sidelight global importance --model diabetes_forest --dataset default
  sidelight global importance --model diabetes_forest --input rows.csv --labels y.npy
  sidelight global dependence --model breast_cancer_gbdt --dataset default --features 0,27
  sidelight global shapley --model diabetes_forest --dataset default --plot beeswarm.png
  sidelight global projection --model digits_cnn --dataset default --layer /pool/MaxPool_output_0
  sidelight global live --model diabetes_linear"""
KINDS = ("importance", "dependence", "shapley", "projection")


def add_commands(sub: Any, connection: Callable[[argparse.ArgumentParser], None],
                 client_of: Callable[[argparse.Namespace], Client]) -> None:
    """The `global` command and its kinds, on the main parser's subparsers."""
    top = sub.add_parser("global", help="dataset-wide explanations (importance, PDP, Shapley, "
                         "projection, live importance)", description=HELP,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = top.add_subparsers(required=True)
    for kind in KINDS:
        p = kinds.add_parser(kind)
        job_options(p, kind)
        connection(p)
        p.set_defaults(run=lambda args, kind=kind: run_job(args, kind, client_of))
    live = kinds.add_parser("live", help="mean |attribution| of the answers served recently")
    live.add_argument("--model", required=True)
    live.add_argument("--window-seconds", type=float, default=0.0)
    live.add_argument("--plot", type=Path)
    connection(live)
    live.set_defaults(run=lambda args: run_live(args, client_of))


def job_options(p: argparse.ArgumentParser, kind: str) -> None:
    p.add_argument("--model", required=True)
    rows = p.add_mutually_exclusive_group(required=True)
    rows.add_argument("--input", type=Path, help=".npy, .csv or .parquet rows")
    rows.add_argument("--dataset", help="a stored dataset (a background's name)")
    p.add_argument("--budget-ms", type=float, default=0.0)
    for flag in ("--max-rows", "--max-evaluations", "--seed"):
        p.add_argument(flag, type=int, default=0)
    p.add_argument("--classes", default="", help="comma-separated output columns")
    p.add_argument("--scale", default="", help="identity, logit or margin")
    p.add_argument("--plot", type=Path, help="write a PNG (needs matplotlib)")
    p.add_argument("--report", type=Path, help="write a self-contained HTML report")
    p.add_argument("--timeout", type=float, help="seconds for the whole job")
    extra: dict[str, list[tuple[str, Callable[[str], object], object]]] = {
        "importance": [("--labels", Path, None), ("--metric", str, ""), ("--repeats", int, 0)],
        "dependence": [("--features", str, "0"), ("--resolution", int, 0),
                       ("--ice-rows", int, 0)],
        "shapley": [("--method", str, ""), ("--background", str, "")],
        "projection": [("--layer", str, ""), ("--components", int, 0)]}
    for flag, parse, default in extra[kind]:
        p.add_argument(flag, type=parse, default=default)
    if kind == "shapley":
        p.add_argument("--interactions", action="store_true")


def run_job(args: argparse.Namespace, kind: str, client_of: Callable[[argparse.Namespace],
                                                                      Client]) -> None:
    with client_of(args) as client:
        try:
            X = None if args.input is None else read_rows(args.input,
                                                          client.model(args.model))
            result = call(client, args, kind, X, Progress())
        except CallError as err:
            sys.exit(str(err))
        except (ValueError, ImportError, OSError) as err:
            sys.exit(f"sidelight: {err}")
    print(render(result))
    pictures(args, result)


def call(client: Client, args: argparse.Namespace, kind: str, X: Any, progress: Progress) -> Any:
    """The job of `kind` with the command's options."""
    common = {"dataset": args.dataset or "", "budget_ms": args.budget_ms, "seed": args.seed,
              "max_rows": args.max_rows, "max_evaluations": args.max_evaluations,
              "classes": [int(c) for c in args.classes.split(",") if c.strip()],
              "scale": args.scale, "timeout": args.timeout, "on_progress": progress.show}
    try:
        if kind == "importance":
            return client.permutation_importance(args.model, X, read_labels(args.labels),
                                                 metric=args.metric, repeats=args.repeats,
                                                 **common)
        if kind == "dependence":
            features = [int(f) if f.strip().isdigit() else f.strip()
                        for f in args.features.split(",")]
            return client.partial_dependence(args.model, X, features,
                                             resolution=args.resolution,
                                             ice_rows=args.ice_rows, **common)
        if kind == "shapley":
            return client.dataset_shapley(args.model, X, method=args.method,
                                          background=args.background,
                                          interactions=args.interactions, **common)
        return client.projection(args.model, X, layer=args.layer, components=args.components,
                                 **common)
    finally:
        progress.finish()


def read_rows(path: Path, info: pb.ModelInfo) -> dict[str, Array]:
    """Every row of a file, as one array per model input."""
    parts = list(batch.open_source(path, info).chunks(4096))
    if not parts:
        raise ValueError(f"{path}: no rows")
    return {name: np.concatenate([p.arrays[name] for p in parts]) for name in parts[0].arrays}


def read_labels(path: Path | None) -> Array | None:
    """One label per row: a .npy array, or a one-column .csv (a header line is skipped)."""
    if path is None:
        return None
    if path.suffix.lower() == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    lines = [v.strip() for v in path.read_text().splitlines() if v.strip()]
    try:
        float(lines[0])
    except (ValueError, IndexError):
        lines = lines[1:]
    return np.array([float(v) for v in lines])


class Progress:
    """The job's reports as one redrawn line on a terminal (nothing otherwise)."""

    def __init__(self) -> None:
        self.live = sys.stderr.isatty()
        self.start = time.monotonic()

    def show(self, p: dpb.DatasetProgress) -> None:
        if not self.live:
            return
        of = f"/{p.total:,}" if p.total else ""
        left = f", ~{p.remaining_ms / 1e3:.1f} s left" if p.remaining_ms >= 0 else ""
        sys.stderr.write(f"\r\x1b[K{p.stage}: {p.done:,}{of} {p.unit}, "
                         f"{p.elapsed_ms / 1e3:.1f} s{left}")
        sys.stderr.flush()

    def finish(self) -> None:
        if self.live:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def render(result: Any) -> str:
    """The numbers as text, the job's summary and notes last."""
    if isinstance(result, jobs.DatasetShapley):
        lines = [table(result.importance(k)) for k in range(len(result.output_names))]
    elif isinstance(result, jobs.Dependence):
        lines = [f"{result.feature}  {result.output or 'output'}  (std. error)"] + [
            f"{g:12.6g}  {a:12.6g}  ({s:.3g})" for g, a, s in
            zip(result.grid, result.average, result.std_errors
                if result.std_errors is not None else np.zeros_like(result.average),
                strict=True)]
    elif isinstance(result, jobs.Dependence2D):
        lines = [f"{result.features[0]} x {result.features[1]}: grid {len(result.grid_x)} x "
                 f"{len(result.grid_y)}; values {np.min(result.values):.4g} to "
                 f"{np.max(result.values):.4g}"]
    elif isinstance(result, jobs.Projection):
        ratio = result.explained_variance_ratio
        lines = [f"{len(result.points)} rows on {result.points.shape[1]} components of "
                 f"{result.name}; variance explained: "
                 + ", ".join(f"{v:.3f}" for v in (ratio if ratio is not None else []))]
    else:
        lines = [table(result)]
    job = getattr(result, "job", None)
    if job is not None:
        lines.append(f"{job.kind} of {job.model} v{job.version}: {job.rows} of "
                     f"{job.dataset_rows} rows, {job.cost.model_evaluations:,} evaluations, "
                     f"{job.cost.elapsed_ms:.0f} ms" + (f", stopped: {job.stopped}"
                                                       if job.stopped else ""))
    lines += [f"note: {n}" for n in (job.notes if job is not None else
                                     getattr(result, "notes", ()))]
    return "\n".join(lines)


def table(imp: Any) -> str:
    """Scores by decreasing value with their standard errors."""
    width = max(len(n) for n in imp.feature_names)
    order = np.argsort(-np.nan_to_num(imp.values, nan=-np.inf), kind="stable")
    head = f"{'feature':<{width}}  {imp.metric or 'importance':>14}  std. error"
    return "\n".join([head, *(f"{imp.feature_names[j]:<{width}}  {imp.values[j]:>14.6g}  "
                              f"{imp.std_errors[j]:.3g}" for j in order)])


def run_live(args: argparse.Namespace, client_of: Callable[[argparse.Namespace],
                                                           Client]) -> None:
    with client_of(args) as client:
        try:
            result = client.live_importance(args.model, window_seconds=args.window_seconds)
        except CallError as err:
            sys.exit(str(err))
    print(table(result) if result.feature_names else "no features")
    print(f"{result.rows} rows from {result.replicas} replica(s) over the last "
          f"{result.window_seconds:g} s")
    for note in result.notes:
        print(f"note: {note}")
    args.report = None
    pictures(args, result)


def pictures(args: argparse.Namespace, result: Any) -> None:
    """--plot and --report: the picture of the result, and a report with its numbers."""
    if not (args.plot or args.report):
        return
    try:
        from service.client import plots, report
    except ImportError as err:
        sys.exit(f"--plot and --report need matplotlib ({err.name} is missing): "
                 "pip install 'sidelight[plots]'")
    parts = [result]
    if isinstance(result, jobs.DatasetShapley):
        parts = [result.importance(k) for k in range(len(result.output_names))]
    if args.plot:
        shown = result.explanation if isinstance(result, jobs.DatasetShapley) and \
            result.explanation is not None else parts[0]
        plots.save(plots.beeswarm(shown) if shown is not parts[0] else figure(plots, shown),
                   args.plot)
        print(f"wrote {args.plot}")
    if args.report:
        r = report.Report(f"Sidelight: {type(result).__name__} of {args.model}")
        for part in parts:
            r.add(part)
        job = getattr(result, "job", None)
        for note in job.notes if job is not None else ():
            r.paragraph(f"note: {note}", css="note")
        r.save(args.report)
        print(f"wrote {args.report}")


def figure(plots: Any, result: Any) -> Any:
    """The picture of one result."""
    if isinstance(result, jobs.Dependence):
        return plots.partial_dependence(result)
    if isinstance(result, jobs.Dependence2D):
        return plots.partial_dependence_2d(result)
    if isinstance(result, jobs.Projection):
        return plots.embedding(result)
    return plots.importance(result)
