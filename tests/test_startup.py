"""Start-up through a real server: nothing configured or stored for one model may stop the others.

One repository holds a healthy model next to models whose explain.yaml or background file is
wrong in a different way each; every check goes through gRPC (issue 11, items 5, 7, 14, 16, 17).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import yaml
from onnx import TensorProto, helper, numpy_helper

from service.api.server import Sidelight, start
from service.api.tensors import from_array
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, ROOT, background_of, settings_for
from tests.redis_process import free_port, wait_for
from tests.test_server import code_of, request

DIABETES = ["age", "sex", "bmi", "bp", "s1", "s2", "s3", "s4", "s5", "s6"]


def add_model(root: Path, name: str, source: str, config: dict[str, object] | None = None,
              background: np.ndarray | None = None) -> Path:
    """A copy of a bundled model's ONNX file under `name`: its explain.yaml updated with
    `config` (a None value removes the key; config None = no explain.yaml at all) and its
    background.npy replaced by `background` when given."""
    directory = root / name
    (directory / "1").mkdir(parents=True)
    (directory / "1" / "model.onnx").write_bytes((MODELS / source / "1/model.onnx").read_bytes())
    bg = background_of(source) if background is None else background
    np.save(directory / "background.npy", bg)
    if config is not None:
        base = yaml.safe_load((MODELS / source / "explain.yaml").read_text())
        base.update(config)
        (directory / "explain.yaml").write_text(
            yaml.safe_dump({k: v for k, v in base.items() if v is not None}))
    return directory


def poisoned(source: str, value: float) -> np.ndarray:
    """The bundled background with one value that no float32 input can take (1e39 is inf in
    float32) or NaN."""
    bg = background_of(source)[:40].copy()
    bg[3, 4] = value
    return bg


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidelight]:
    root = tmp_path_factory.mktemp("mixed")
    add_model(root, "good", "diabetes_linear", {})
    add_model(root, "huge_file", "breast_cancer_mlp", {}, poisoned("breast_cancer_mlp", 1e39))
    add_model(root, "nan_file", "diabetes_linear", {}, poisoned("diabetes_linear", np.nan))
    add_model(root, "bad_classes", "breast_cancer_mlp", {"classes": [5]})
    add_model(root, "bad_class_names", "breast_cancer_mlp", {"class_names": ["a", "b", "c"]})
    add_model(root, "bad_method", "diabetes_linear", {"method": "magic"})
    add_model(root, "logit_regression", "diabetes_linear", {"scale": "logit"})
    add_model(root, "margin_regression", "diabetes_linear", {"scale": "margin"})
    add_model(root, "margin", "breast_cancer_gbdt", {"scale": "margin"})
    add_model(root, "no_background", "diabetes_linear", None)
    header = add_model(root, "csv_header", "diabetes_linear",
                       {"features": None, "background": {"path": "bg.csv"}})
    np.savetxt(header / "bg.csv", background_of("diabetes_linear")[:20], delimiter=",",
               header=",".join(DIABETES), comments="")
    app = start(settings_for(root, drift_reference_rows=2))
    yield app
    app.stop(grace=0)


@pytest.fixture(scope="module")
def mixed_stub(mixed: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{mixed.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def info(stub: pb_grpc.ExplainerStub, model: str) -> pb.ModelInfo:
    return stub.GetModel(pb.GetModelRequest(model=model))


def diabetes_rows(n: int = 2) -> np.ndarray:
    return background_of("diabetes_linear")[:n]


def test_the_healthy_model_serves_next_to_every_broken_one(
        mixed_stub: pb_grpc.ExplainerStub) -> None:
    r = mixed_stub.Explain(request("good", diabetes_rows(), budget_ms=300))
    assert len(r.rows) == 2 and r.method == "linear"
    states = {m.name: m.state for m in mixed_stub.ListModels(pb.ListModelsRequest()).models}
    assert states["good"] == "READY" and len(states) == 11
    g = info(mixed_stub, "good")
    assert list(g.notes) == [] and g.drift_active and g.drift_status == "active"


@pytest.mark.parametrize("model", ["huge_file", "nan_file"])
def test_a_poisoned_background_file_starts_the_model_without_it(
        mixed_stub: pb_grpc.ExplainerStub, model: str) -> None:
    """Item 5: 1e39 (inf in the model's float32) or NaN in background.npy: the model is READY
    without that background, says why and how to fix it, and Explain says the same."""
    m = info(mixed_stub, model)
    assert m.state == "READY" and m.background_rows == 0
    notes = " ".join(m.notes)
    assert "background.npy" in notes and "row 3, feature 4" in notes and "float32" in notes
    assert "PutBackground" in notes
    assert not m.drift_active and "background" in m.drift_status
    row = background_of("breast_cancer_mlp" if model == "huge_file" else "diabetes_linear")[:1]
    code, details = code_of(lambda: mixed_stub.Explain(request(model, row, budget_ms=300)))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and "PutBackground" in details
    assert "row 3, feature 4" in details  # the reason, not only the fix


def test_a_good_upload_repairs_a_model_whose_file_was_poisoned(
        mixed_stub: pb_grpc.ExplainerStub) -> None:
    bg = background_of("diabetes_linear")[:30]
    mixed_stub.PutBackground(pb.PutBackgroundRequest(model="nan_file",
                                                     data=from_array("data", bg)))
    r = mixed_stub.Explain(request("nan_file", diabetes_rows(1), budget_ms=300))
    assert r.background_rows == 30 and np.all(np.isfinite(r.rows[0].attributions))
    assert "no background" not in " ".join(info(mixed_stub, "nan_file").notes)
    # drift, off for want of a background, starts once an explanation finds one
    assert wait_for(lambda: info(mixed_stub, "nan_file").drift_status == "active", 10)


@pytest.mark.parametrize(("model", "reason"), [
    ("bad_classes", "classes: [5] out of range"),
    ("bad_class_names", "class_names: 3 names"),
    ("bad_method", "method: unknown method 'magic'"),
    ("logit_regression", "logit needs probabilities"),
    ("margin_regression", "has no link"),
])
def test_a_config_that_does_not_fit_the_model_fails_only_that_model(
        mixed_stub: pb_grpc.ExplainerStub, model: str, reason: str) -> None:
    """Item 7: explain.yaml checked against the model at load; ListModels and GetModel keep
    working for the whole repository."""
    m = info(mixed_stub, model)
    assert m.state == "FAILED" and reason in m.error and "explain.yaml" in m.error
    listed = {x.name: x for x in mixed_stub.ListModels(pb.ListModelsRequest()).models}
    assert listed[model].state == "FAILED" and listed["good"].state == "READY"
    code, details = code_of(lambda: mixed_stub.Explain(request(model, diabetes_rows(1))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason in details


def test_scale_margin_in_explain_yaml_is_accepted_and_used(
        mixed_stub: pb_grpc.ExplainerStub) -> None:
    """Item 14: README documents `scale: margin`; the schema accepts it."""
    m = info(mixed_stub, "margin")
    assert m.state == "READY" and m.scale == "margin"
    row = background_of("breast_cancer_gbdt")[:1]
    r = mixed_stub.Explain(request("margin", row, budget_ms=300))
    assert r.scale == "margin" and r.method == "tree"
    phi = np.array(r.rows[0].attributions)
    assert r.rows[0].predictions[0] - r.rows[0].base_values[0] == pytest.approx(phi.sum())


def test_a_csv_background_with_a_header_names_the_features(
        mixed_stub: pb_grpc.ExplainerStub) -> None:
    """Item 16: a header row is read as feature names when explain.yaml gives none."""
    m = info(mixed_stub, "csv_header")
    assert m.state == "READY" and list(m.feature_names) == DIABETES and m.background_rows == 20
    r = mixed_stub.Explain(request("csv_header", diabetes_rows(1), budget_ms=300))
    assert list(r.feature_names) == DIABETES and r.background_rows == 20


def test_a_model_without_background_says_how_to_provide_one(
        mixed_stub: pb_grpc.ExplainerStub) -> None:
    """Item 17: READY, with a note and an error that name both ways of giving a background."""
    m = info(mixed_stub, "no_background")
    assert m.state == "READY" and m.background_rows == 0
    notes = " ".join(m.notes)
    assert "no background" in notes and "explain.yaml" in notes and "PutBackground" in notes
    code, details = code_of(lambda: mixed_stub.Explain(request("no_background",
                                                               diabetes_rows(1))))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "explain.yaml" in details and "PutBackground" in details


# --- attribution drift on models whose default method is slow (item 18) ----------------------
def slow_model(features: int, hidden: int, layers: int) -> onnx.ModelProto:
    """A flattened-image regressor (features -> hidden x layers -> 1, tanh): far slower per
    permutation than the fixed 10 ms per reference row allows (~22k rows/s here)."""
    rng = np.random.default_rng(0)
    weights, nodes, previous, width = [], [], "input", features
    for k in range(layers):
        w = (rng.normal(size=(width, hidden)) / np.sqrt(width)).astype(np.float32)
        weights.append(numpy_helper.from_array(w, f"w{k}"))
        nodes += [helper.make_node("MatMul", [previous, f"w{k}"], [f"m{k}"]),
                  helper.make_node("Tanh", [f"m{k}"], [f"h{k}"])]
        previous, width = f"h{k}", hidden
    out = (rng.normal(size=(width, 1)) / np.sqrt(width)).astype(np.float32)
    weights.append(numpy_helper.from_array(out, "out"))
    nodes.append(helper.make_node("MatMul", [previous, "out"], ["score"]))
    graph = helper.make_graph(
        nodes, "slow", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def add_slow_model(root: Path) -> None:
    (root / "slow" / "1").mkdir(parents=True)
    (root / "slow" / "1" / "model.onnx").write_bytes(slow_model(256, 1024, 2).SerializeToString())
    np.save(root / "slow" / "bg.npy", np.random.default_rng(1).normal(size=(50, 256)))
    (root / "slow" / "explain.yaml").write_text("background: {path: bg.npy}\nbudget_ms: 1000\n")


def test_attribution_drift_starts_for_a_model_too_slow_for_the_start_up_budget(
        tmp_path: Path) -> None:
    """The reference for a slow default method is computed after start-up with the model's
    own budget per row; GetModel says pending, then active."""
    add_model(tmp_path, "good", "diabetes_linear", {})
    add_slow_model(tmp_path)
    started = time.monotonic()
    app = start(settings_for(tmp_path, drift_reference_rows=1))
    try:
        assert time.monotonic() - started < 10  # the slow reference did not hold start-up
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            stub = pb_grpc.ExplainerStub(channel)
            first = info(stub, "slow")
            assert first.drift_active and first.drift_status in ("pending", "active")
            assert wait_for(lambda: info(stub, "slow").drift_status == "active", 30)
        assert app.plane is not None and app.plane.drift is not None
        source = {s.model: s for s in app.plane.drift.sources()}["slow"]
        assert source.monitor.attributions is not None
    finally:
        app.stop(grace=0)


def test_drift_status_says_why_drift_is_off(tmp_path: Path) -> None:
    add_model(tmp_path, "good", "diabetes_linear", {})
    app = start(settings_for(tmp_path, drift_enabled=False, metrics_port=-1))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
            m = info(pb_grpc.ExplainerStub(channel), "good")
        assert not m.drift_active and "SIDELIGHT_DRIFT_ENABLED" in m.drift_status
    finally:
        app.stop(grace=0)


def test_a_replica_stopped_while_computing_a_late_reference_exits_cleanly(
        tmp_path: Path) -> None:
    """SIGTERM while the late reference runs: the thread is stopped and waited for (a thread
    left inside onnxruntime at interpreter exit aborts the process)."""
    add_slow_model(tmp_path)
    port = free_port()
    env = dict(os.environ, SIDELIGHT_DRIFT_REFERENCE_ROWS="16", SIDELIGHT_HOST="127.0.0.1",
               PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--models",
                             str(tmp_path), "--port", str(port), "--metrics-port", "-1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: _status(port) == "pending" or proc.poll() is not None, 60)
    finally:
        proc.terminate()
        started = time.monotonic()
        code = proc.wait(timeout=30)
    assert code == 0 and time.monotonic() - started < 10


def _status(port: int) -> str:
    """The slow model's drift status, on a fresh channel (no reconnect backoff to wait out)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            return info(pb_grpc.ExplainerStub(channel), "slow").drift_status
        except grpc.RpcError:
            return ""
