"""Metrics through a real scrape of /metrics: cost, quality, outcomes, drift, load shedding."""

from __future__ import annotations

import shutil
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from service.api.server import Sidelight, start
from service.api.tensors import from_array
from service.monitoring.monitors import exported_features
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


@pytest.fixture(scope="module")
def monitored() -> Iterator[Sidelight]:
    app = start(settings_for(MODELS))
    yield app
    app.stop(grace=0)


def explain(stub: pb_grpc.ExplainerStub, X: np.ndarray, **kw: object) -> pb.ExplainResponse:
    return stub.Explain(pb.ExplainRequest(  # type: ignore[arg-type]
        model="breast_cancer_mlp", inputs=[from_array("input", X)],
        **{"budget_ms": 2000, "max_evaluations": 20_000, **kw}))  # the cap binds: load-proof


def test_traffic_moves_cost_quality_and_drift_metrics(monitored: Sidelight) -> None:
    bg = background_of("breast_cancer_mlp")
    with grpc.insecure_channel(f"127.0.0.1:{monitored.port}") as ch:
        stub = pb_grpc.ExplainerStub(ch)
        for i in range(0, 40, 4):
            explain(stub, bg[i:i + 4])
        shifted = bg[:40].copy()
        shifted[:, 0] *= 3.0  # mean radius far outside its reference range
        for i in range(0, 40, 4):
            explain(stub, shifted[i:i + 4])
        with pytest.raises(grpc.RpcError):
            stub.Explain(pb.ExplainRequest(model="nope"))
    s = scrape(monitored.metrics_port)
    ok = value(s, "sidelight_explain_requests_total", model="breast_cancer_mlp",
               method="auto", code="OK")
    assert ok == 20
    assert value(s, "sidelight_explain_requests_total", model="_unknown", method="auto",
                 code="NOT_FOUND") == 1
    assert value(s, "sidelight_explain_rows_total", model="breast_cancer_mlp",
                 method="permutation") == 80
    assert value(s, "sidelight_explain_model_evaluations_count", model="breast_cancer_mlp",
                 method="permutation") == 80
    assert value(s, "sidelight_explain_cpu_seconds_total", model="breast_cancer_mlp") > 0
    assert value(s, "sidelight_explain_additivity_gap_bucket", model="breast_cancer_mlp",
                 method="permutation", le="1e-09") == 80
    assert value(s, "sidelight_explain_relative_std_error_count", model="breast_cancer_mlp",
                 method="permutation") == 80
    psi = {dict(k[1])["feature"]: v for k, v in s.items()
           if k[0] == "sidelight_drift_input_psi" and dict(k[1])["model"] == "breast_cancer_mlp"}
    assert len(psi) == 30
    others = np.median([v for f, v in psi.items() if f != "mean radius"])
    assert psi["mean radius"] > 1.0 and psi["mean radius"] > 5 * others
    assert value(s, "sidelight_drift_window_rows", model="breast_cancer_mlp") == 80
    ratio = value(s, "sidelight_drift_attribution_ratio", model="breast_cancer_mlp",
                  feature="mean radius")
    assert np.isfinite(ratio) and ratio > 0
    shift = {dict(k[1])["feature"]: v for k, v in s.items()
             if k[0] == "sidelight_drift_attribution_shift"
             and dict(k[1])["model"] == "breast_cancer_mlp"}
    assert len(shift) == 30 and max(shift, key=lambda f: shift[f]) == "mean radius"
    rank = value(s, "sidelight_drift_attribution_rank_change", model="breast_cancer_mlp")
    assert 0.0 <= rank <= 1.0
    assert ("sidelight_drift_prediction_psi",
            (("model", "breast_cancer_mlp"), ("output", "benign"))) in s
    assert value(s, "sidelight_model_ready", model="breast_cancer_mlp", version="1") == 1


def test_load_beyond_max_in_flight_is_shed_and_counted() -> None:
    app = start(settings_for(MODELS, max_in_flight=1, drift_reference_rows=0))
    try:
        X = background_of("breast_cancer_mlp")[:1]
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = pb_grpc.ExplainerStub(ch)

            def one(_: int) -> str:
                try:
                    stub.Explain(pb.ExplainRequest(model="breast_cancer_mlp", budget_ms=300,
                                                   inputs=[from_array("input", X)]))
                    return "OK"
                except grpc.RpcError as err:
                    return str(err.code().name)

            with ThreadPoolExecutor(4) as pool:
                codes = list(pool.map(one, range(4)))
        assert "OK" in codes and "RESOURCE_EXHAUSTED" in codes
        shed = codes.count("RESOURCE_EXHAUSTED")
        assert value(scrape(app.metrics_port), "sidelight_explain_rejected_total",
                     reason="overload") == shed
    finally:
        app.stop(grace=0)


def test_drift_label_cardinality_is_capped_by_importance() -> None:
    importance = np.array([0.1, 5.0, 0.2, 3.0, 0.0])
    assert exported_features(5, importance, 10) == (0, 1, 2, 3, 4)
    assert exported_features(5, importance, 2) == (1, 3)
    assert exported_features(5, None, 2) == (0, 1)


def copy_model(tmp_path: Path, name: str, reference: str | None) -> Path:
    """diabetes_linear under another name, with explain.yaml's drift_reference set."""
    model = tmp_path / name
    shutil.copytree(MODELS / "diabetes_linear", model)
    config = yaml.safe_load((model / "explain.yaml").read_text())
    config["drift_reference"] = {"path": reference}
    (model / "explain.yaml").write_text(yaml.safe_dump(config))
    return model


def test_drift_is_measured_against_explain_yamls_drift_reference(tmp_path: Path) -> None:
    bg = background_of("diabetes_linear")
    recent = bg.copy()
    recent[:, 2] += 10 * bg[:, 2].std()  # the reference window saw much higher bmi
    np.save(copy_model(tmp_path, "windowed", "recent.npy") / "recent.npy", recent)
    copy_model(tmp_path, "unreadable", "missing.npy")  # falls back to the background, logged
    app = start(settings_for(tmp_path, drift_reference_rows=4))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = pb_grpc.ExplainerStub(ch)
            for model in ("windowed", "unreadable"):
                stub.Explain(pb.ExplainRequest(model=model, inputs=[from_array("input", bg[:200])],
                                               budget_ms=500))
        s = scrape(app.metrics_port)
    finally:
        app.stop(grace=0)
    psi = {(m, f): value(s, "sidelight_drift_input_psi", model=m, feature=f)
           for m in ("windowed", "unreadable") for f in ("bmi", "age")}
    assert psi[("windowed", "bmi")] > 2.0  # background-like traffic vs a high-bmi reference
    assert psi[("windowed", "age")] < 0.1
    assert psi[("unreadable", "bmi")] < 0.1 and psi[("unreadable", "age")] < 0.1
    assert value(s, "sidelight_model_ready", model="unreadable", version="1") == 1
