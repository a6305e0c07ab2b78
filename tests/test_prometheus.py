"""The Grafana dashboard and the alert rules against a real Prometheus scraping a real server.

A dedicated sidecar gets normal traffic, shifted traffic (mean radius x3), errors, a shed burst,
a converged request and a repeated one; Debian's `prometheus` (installed by `make install`)
scrapes it every second on loopback and evaluates the alert rules every second. Then every PromQL
expression of the dashboard (panels and the model variable) and of the rules is evaluated through
the HTTP API and must return data.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import yaml

from service.api.server import Sidelight, start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, ROOT, background_of, settings_for

PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
pytestmark = pytest.mark.skipif(
    PROMETHEUS is None or PROMTOOL is None,
    reason="prometheus/promtool not on PATH: `make install` installs Debian's prometheus package "
           "when apt-get is usable as root (apt-get install prometheus)")

DASHBOARD = ROOT / "deploy" / "grafana" / "sidelight.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yml"
COMPOSE_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
MODEL = "breast_cancer_mlp"  # the dashboard's $model in this test
SHIFTED = "mean radius"
ROWS_PER_CALL, NORMAL_CALLS, SHIFTED_CALLS = 8, 10, 15
# Grafana's values: the model picked, the scrape job picked, every namespace (All is ".*", which
# also matches this Prometheus' series, which have no namespace label).
VARIABLES = {"$__rate_interval": "1m", "${model}": MODEL, "$model": MODEL, "$job": "sidelight",
             "$namespace": ".*"}
Json = dict[str, Any]


@dataclass
class Stack:
    app: Sidelight
    url: str  # Prometheus' base URL

    def query(self, expr: str) -> list[Json]:
        """Instant query through the HTTP API; the result vector (raises on a bad expression)."""
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def get(self, path: str) -> Json:
        with urllib.request.urlopen(f"{self.url}{path}", timeout=10) as r:
            return dict(json.load(r)["data"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Any, what: str, timeout: float = 30.0) -> None:
    """Poll `check()` until it is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except OSError:
            pass
        time.sleep(0.25)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def prometheus_config(metrics_port: int) -> str:
    return yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [{"job_name": "sidelight",
                            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}]}],
    })


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("prometheus")
    app = start(settings_for(MODELS, metrics_port=0, max_in_flight=2))
    (tmp / "prometheus.yml").write_text(prometheus_config(app.metrics_port))
    port = free_port()
    log = (tmp / "prometheus.log").open("w")
    assert PROMETHEUS is not None
    process = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        s = Stack(app, f"http://127.0.0.1:{port}")
        wait_for(lambda: process.poll() is None and s.query('up{job="sidelight"} == 1'),
                 f"Prometheus to scrape the sidecar (log: {tmp / 'prometheus.log'})")
        rows = send_traffic(app)
        wait_for(lambda: drift_window_rows(s) >= rows,
                 "the drift window of the scraped metrics to hold every row sent")
        time.sleep(2.0)  # two more rule evaluations (every second) on the final data
        yield s
    finally:
        process.terminate()
        process.wait(timeout=10)
        log.close()
        app.stop(grace=0)


def drift_window_rows(s: Stack) -> float:
    result = s.query(f'sidelight_drift_window_rows{{model="{MODEL}"}}')
    return float(result[0]["value"][1]) if result else -1.0


# ------------------------------------------------------------------------------------ traffic


def explain(stub: pb_grpc.ExplainerStub, X: np.ndarray, budget_ms: float = 120,
            model: str = MODEL, timeout: float = 10.0, **kw: Any) -> str:
    """One Explain call; its status code name."""
    try:
        stub.Explain(pb.ExplainRequest(model=model, budget_ms=budget_ms,
                                       inputs=[from_array("input", X)], **kw), timeout=timeout)
        return "OK"
    except grpc.RpcError as err:
        return str(err.code().name)


def send_traffic(app: Sidelight) -> int:
    """Normal rows, errors, a shed burst, then rows with mean radius x3 and more errors; the
    phases are seconds apart so every counter moves between scrapes. Returns the rows explained
    (besides a repeated call, which a result cache may answer)."""
    bg = background_of(MODEL)
    shifted = bg.copy()
    shifted[:, 0] *= 3.0  # column 0 is mean radius: far outside its reference range
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        codes = [explain(stub, batch(bg, i)) for i in range(NORMAL_CALLS)]
        assert codes == ["OK"] * NORMAL_CALLS, codes
        errors(stub, bg)
        with ThreadPoolExecutor(6) as pool:  # max_in_flight=2: some are shed
            burst = list(pool.map(lambda _: explain(stub, bg[:1], budget_ms=300), range(6)))
        assert "RESOURCE_EXHAUSTED" in burst, burst
        time.sleep(2.5)
        assert explain(stub, batch(bg, 0)) == "OK"  # the first call again: a result-cache hit
        codes = [explain(stub, batch(shifted, i)) for i in range(SHIFTED_CALLS)]
        assert codes == ["OK"] * SHIFTED_CALLS, codes
        errors(stub, bg)
    return (NORMAL_CALLS + SHIFTED_CALLS) * ROWS_PER_CALL + burst.count("OK") + 2


def batch(X: np.ndarray, i: int) -> np.ndarray:
    """The i-th batch of ROWS_PER_CALL rows, wrapping around X."""
    return X[np.arange(i * ROWS_PER_CALL, (i + 1) * ROWS_PER_CALL) % X.shape[0]]


def errors(stub: pb_grpc.ExplainerStub, bg: np.ndarray) -> None:
    """Client errors, a server-side DEADLINE_EXCEEDED, and a row that meets its accuracy goal."""
    assert explain(stub, bg[:1], model="no_such_model") == "NOT_FOUND"
    assert explain(stub, bg[:1, :5]) == "INVALID_ARGUMENT"
    assert explain(stub, bg[:1], budget_ms=0, timeout=0.01) == "DEADLINE_EXCEEDED"
    assert explain(stub, bg[:1], budget_ms=200, target_error=10.0) == "OK"


# ---------------------------------------------------------------------------------- queries


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every panel target and query variable of the dashboard."""
    board = json.loads(DASHBOARD.read_text())
    out: list[tuple[str, str]] = []

    def walk(panels: list[Json]) -> None:
        for p in panels:
            out.extend((f"panel {p['title']!r} {t['refId']}", t["expr"])
                       for t in p.get("targets", []))
            walk(p.get("panels", []))

    walk(board["panels"])
    for v in board["templating"]["list"]:
        if v["type"] == "query":
            out.append((f"variable ${v['name']}", label_values(v["query"]["query"])))
    return out


def label_values(query: str) -> str:
    """Grafana's label_values(metric, label) as the PromQL that returns the same label set."""
    match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query.strip())
    assert match, f"unsupported variable query {query!r}"
    return f"group by ({match.group(2)}) ({match.group(1)})"


def substitute(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unsubstituted Grafana variable in {expr!r}"
    return expr


def rules() -> list[Json]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def signal(expr: str) -> str:
    """An alert expression with every comparison against a number made `bool`: 0/1 for every
    series the alert watches, so 'returns data' means the alert can see its input."""
    return re.sub(r"(==|!=|>=|<=|>|<)(\s*)(?=[-+]?[0-9.])", r"\1 bool\2", expr)


def has_data(result: list[Json]) -> bool:
    """At least one sample that is a number (a NaN-only answer shows no data in Grafana)."""
    return any(not math.isnan(float(r["value"][1])) for r in result)


def test_every_dashboard_query_returns_data(stack: Stack) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 25
    empty = [f"{where}: {substitute(expr)}" for where, expr in queries
             if not has_data(stack.query(substitute(expr)))]
    assert not empty, "queries without data:\n" + "\n".join(empty)


def test_every_alert_rule_sees_its_signal(stack: Stack) -> None:
    alerts = rules()
    assert {"SidelightErrorRate", "SidelightBudgetExhaustion", "SidelightInputDrift",
            "SidelightAttributionDrift", "SidelightRedisDown"} <= {r["alert"] for r in alerts}
    empty = [f"{r['alert']}: {signal(r['expr'])}" for r in alerts
             if not has_data(stack.query(signal(r["expr"])))]
    assert not empty, "alert signals without data:\n" + "\n".join(empty)
    health = {r["name"]: (r["health"], r.get("lastError", ""))
              for g in stack.get("/api/v1/rules")["groups"] for r in g["rules"]}
    assert set(health) == {r["alert"] for r in alerts}
    assert all(h == "ok" for h, _ in health.values()), health


def by_feature(stack: Stack, metric: str) -> dict[str, float]:
    return {r["metric"]["feature"]: float(r["value"][1])
            for r in stack.query(f'{metric}{{model="{MODEL}"}}')}


def test_shifted_inputs_move_drift_and_fire_the_input_drift_alert(stack: Stack) -> None:
    rule = next(r for r in rules() if r["alert"] == "SidelightInputDrift")
    firing = {(r["metric"]["model"], r["metric"]["feature"]) for r in stack.query(rule["expr"])}
    assert (MODEL, SHIFTED) in firing
    assert len(firing) <= 3, firing  # the shifted feature, not everything
    psi = by_feature(stack, "sidelight_drift_input_psi")
    assert psi[SHIFTED] > 1.0 and psi[SHIFTED] == max(psi.values())
    shift = by_feature(stack, "sidelight_drift_attribution_shift")
    assert shift[SHIFTED] > 0.02 and shift[SHIFTED] == max(shift.values())  # gained the most
    assert by_feature(stack, "sidelight_drift_attribution_ratio")[SHIFTED] > 2.0
    active = {(a["labels"]["alertname"], a["labels"].get("feature"))
              for a in stack.get("/api/v1/alerts")["alerts"]}
    assert ("SidelightInputDrift", SHIFTED) in active  # pending: it needs 15 minutes to fire
    assert not any(name == "SidelightRedisDown" for name, _ in active)


def test_promtool_accepts_the_rules_and_the_compose_config(tmp_path: Path) -> None:
    assert PROMTOOL is not None
    rules_check = subprocess.run([PROMTOOL, "check", "rules", str(RULES)], capture_output=True,
                                 text=True, timeout=60)
    assert rules_check.returncode == 0, rules_check.stdout + rules_check.stderr
    config = yaml.safe_load(COMPOSE_CONFIG.read_text())
    assert config["rule_files"] == ["/etc/prometheus/rules.yml"]  # where compose mounts it
    config["rule_files"] = [str(RULES)]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    config_check = subprocess.run([PROMTOOL, "check", "config", str(tmp_path / "prometheus.yml")],
                                  capture_output=True, text=True, timeout=60)
    assert config_check.returncode == 0, config_check.stdout + config_check.stderr
