"""Budget adherence through a real gRPC server: the server runs in its own process (its own
GIL, as in production), clients call it from threads of this one."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np

from benchmarks._models import ROOT
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc

SERVER = """
import sys
from service.config import Settings
from service.api.server import start
app = start(Settings(models_dir=sys.argv[1], port=0, metrics_port=-1, host="127.0.0.1",
                     result_cache_size=0))  # every call is computed, none served from cache
print(app.port, flush=True)
sys.stdin.read()
app.stop(grace=0)
"""


@contextmanager
def python_child(script: str, *args: str) -> Iterator[subprocess.Popen[str]]:
    """`python -c script args` from the project root with text pipes; closing its stdin asks it
    to stop (killed after 10 s)."""
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=ROOT,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.stdin:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@contextmanager
def server(repo: Path) -> Iterator[int]:
    """Start `sidelight` on a free port in a child process; yields the port."""
    with python_child(SERVER, str(repo)) as proc:
        assert proc.stdout is not None
        yield int(proc.stdout.readline())


@dataclass(frozen=True)
class Call:
    """One Explain call's budget (0 = none), the client's deadline, and what came back."""

    budget_ms: float
    timeout_s: float
    wall_ms: float
    server_ms: float
    code: str
    budget_exhausted: bool


def plan(n: int, low_ms: float, high_ms: float, seed: int) -> list[float]:
    """n budgets log-uniform in [low_ms, high_ms]."""
    rng = np.random.default_rng(seed)
    return list(np.exp(rng.uniform(np.log(low_ms), np.log(high_ms), n)))


def call(stub: pb_grpc.ExplainerStub, model: str, x: np.ndarray, budget_ms: float,
         timeout_s: float, use_budget: bool, seed: int = 1, input_name: str = "input",
         **fields: object) -> Call:
    """One Explain; budget_ms is sent only when use_budget (else the deadline sets it).
    `fields`: more ExplainRequest fields (method, groups, ...)."""
    request = pb.ExplainRequest(model=model, inputs=[from_array(input_name, x[None])],
                                seed=seed, budget_ms=budget_ms if use_budget else 0.0,
                                **fields)  # type: ignore[arg-type]
    start = time.perf_counter()
    try:
        r = stub.Explain(request, timeout=timeout_s)
        code, server_ms, exhausted = "OK", r.cost.elapsed_ms, r.cost.budget_exhausted
    except grpc.RpcError as err:
        code, server_ms, exhausted = err.code().name, float("nan"), False
    wall = 1e3 * (time.perf_counter() - start)
    return Call(budget_ms, timeout_s, wall, server_ms, code, exhausted)


def run_calls(port: int, jobs: list[tuple[str, np.ndarray, float, float, bool]],
              clients: int) -> list[Call]:
    """Run the jobs (model, row, budget_ms, timeout_s, use_budget) from `clients` threads,
    each with its own seed (no two requests are alike; the server's result cache is off)."""
    results: list[Call | None] = [None] * len(jobs)
    ready = threading.Barrier(clients)

    def worker(k: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = pb_grpc.ExplainerStub(ch)
            call(stub, *jobs[k][:2], 50.0, 1.0, True)  # connect and warm this channel
            ready.wait()
            for i in range(k, len(jobs), clients):
                results[i] = call(stub, *jobs[i], seed=i)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [r for r in results if r is not None]


def p99_cell(values: np.ndarray) -> str:
    """A table cell: the 99th percentile and how many values it rests on."""
    return f"{np.percentile(values, 99):.2f} (n={values.size})" if values.size else "-"
