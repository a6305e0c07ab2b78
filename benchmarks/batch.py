"""A batch file through the command line against the same rows sent one call each.

A sidelight server runs in its own process (result cache off) on a repository of the two
models measured. The batch is `sidelight explain --input rows.npy --out results.parquet` run as
a child process (default chunks of 256 rows, 4 in flight), timed from its start to its exit, so
the figure includes starting Python, reading the file and writing parquet; the CLI's own rate
(its run without start-up) is shown too. "One call each" is `Client.explain` on one row at a
time from one thread: what a loop over rows does. Both explain the same rows with the same
method, exact ones (tree, linear), so both do the same work on the server."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks._server import server
from service.client import Client

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "examples" / "models"
CASES = (("breast_cancer_gbdt", "tree"), ("diabetes_linear", "linear"))


def rows(model: str, n: int) -> np.ndarray:
    """n rows: the model's background resampled with 1% noise (no two alike), float32."""
    base = np.load(MODELS / model / "background.npy").astype(np.float64)
    rng = np.random.default_rng(0)
    picked = base[rng.integers(0, len(base), n)]
    return (picked * (1 + 0.01 * rng.standard_normal(picked.shape))).astype(np.float32)


def batch(port: int, model: str, method: str, path: Path, out: Path) -> tuple[float, float]:
    """Wall seconds of the whole command, and the rows/s it reports for its own run."""
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "service.cli", "explain", "--address",
                           f"127.0.0.1:{port}", "--model", model, "--method", method,
                           "--budget-ms", "5000", "--input", str(path), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - started
    reported = re.search(r"\(([\d,]+) rows/s\)", done.stdout)
    return wall, float(reported.group(1).replace(",", "")) if reported else float("nan")


def one_by_one(port: int, model: str, method: str, X: np.ndarray) -> float:
    """Seconds to explain every row in its own call."""
    with Client(f"127.0.0.1:{port}") as client:
        client.explain(model, X[:1], method=method, budget_ms=5000)  # connect, GetModel
        started = time.perf_counter()
        for x in X:
            client.explain(model, x[None], method=method, budget_ms=5000)
        return time.perf_counter() - started


def run(quick: bool) -> str:
    n = 1_000 if quick else 10_000
    lines = ["## Batch files through the command line", "", __doc__.split("\n\n", 1)[1].strip(),
             "", f"Rows per file: {n:,}. Command: `python -m benchmarks.run --only batch`.", "",
             "| model, method | `sidelight explain --input --out` (whole command) | its own rate "
             "| one call per row | batch / one-by-one |", "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        repo = Path(tmp) / "repo"
        for model, _ in CASES:
            shutil.copytree(MODELS / model, repo / model)
        with server(repo) as port:
            for model, method in CASES:
                X = rows(model, n)
                np.save(Path(tmp) / "rows.npy", X)
                wall, own = batch(port, model, method, Path(tmp) / "rows.npy",
                                  Path(tmp) / "results.parquet")
                single = one_by_one(port, model, method, X)
                lines.append(f"| {model}, {method} | {n / wall:,.0f} rows/s ({wall:.1f} s) | "
                             f"{own:,.0f} rows/s | {n / single:,.0f} rows/s ({single:.1f} s) | "
                             f"{single / wall:.1f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(run("--quick" in sys.argv))
