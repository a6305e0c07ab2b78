"""Models change without restarts (issue 16): a real server looks at a temporary copy of the
bundled models every 0.2 s. A replaced model.onnx, a new version directory and a changed
explain.yaml are picked up within a few looks while calls keep succeeding; a broken file leaves
the version loaded before serving and says so (GetModel notes, the reload counter, one log
line). Each test owns one model of the repository, so they share the server."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import generate_latest

from service.api.server import Sidelight, start
from service.models.stamps import ModelStamp, scan_model, scan_repository, settled
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for
from tests.redis_process import RedisProcess, wait_for
from tests.test_server import code_of, request

INTERVAL_S = 0.2
SWAP_WITHIN_S = 10.0  # generous for a loaded 2-core machine; measured: 0.2-0.5 s
NAMES = ("replaced", "broken", "versions", "configured", "removed")
X = background_of("diabetes_linear")[:3].astype(np.float32)  # (3, 10)


def scaled_model(factor: float) -> bytes:
    """diabetes_linear with coefficients and intercept times `factor`: f becomes factor * f,
    so predictions and (linear, exact) attributions scale by it too."""
    model = onnx.load(MODELS / "diabetes_linear" / "1" / "model.onnx")
    for attr in model.graph.node[0].attribute:
        if attr.name in ("coefficients", "intercepts"):
            attr.floats[:] = [factor * v for v in attr.floats]
    return model.SerializeToString()


def replace_file(path: Path, data: bytes) -> None:
    """Write beside, then rename over: what a careful deployment does."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("reload")
    for name in NAMES:
        shutil.copytree(MODELS / "diabetes_linear", root / name)
    return root


@pytest.fixture(scope="module")
def app(repo: Path) -> Iterator[Sidelight]:
    running = start(settings_for(repo, reload_interval_seconds=INTERVAL_S,
                                 drift_reference_rows=2))
    yield running
    running.stop(grace=0)


@pytest.fixture(scope="module")
def stub(app: Sidelight) -> Iterator[pb_grpc.ExplainerStub]:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as channel:
        yield pb_grpc.ExplainerStub(channel)


def reloads(app: Sidelight, model: str, outcome: str) -> float:
    value = app.metrics.registry.get_sample_value(
        "sidelight_model_reloads_total", {"model": model, "outcome": outcome})
    return -1.0 if value is None else value


def predictions(r: pb.ExplainResponse) -> np.ndarray:
    return np.array([row.predictions[0] for row in r.rows])  # (rows,)


def attributions(r: pb.ExplainResponse) -> np.ndarray:
    return np.array([row.attributions for row in r.rows])  # (rows, features)


def test_a_replaced_model_file_serves_within_the_interval_while_calls_succeed(
        app: Sidelight, stub: pb_grpc.ExplainerStub, repo: Path) -> None:
    old = stub.Explain(request("replaced", X, budget_ms=500))
    assert old.method == "linear" and reloads(app, "replaced", "loaded") == 0
    new_bytes = scaled_model(2.0)
    results: list[pb.ExplainResponse] = []
    stop = threading.Event()

    def hammer(seed: int) -> None:  # fast calls before, during and after the swap
        while not stop.is_set():
            results.append(stub.Explain(request("replaced", X, budget_ms=500, seed=seed)))
            seed += 4

    with ThreadPoolExecutor(5) as pool:
        slow = pool.submit(stub.Explain, request("replaced", X[:1], method="permutation",
                                                 budget_ms=2000))  # in flight at the swap
        calls = [pool.submit(hammer, i) for i in range(4)]
        time.sleep(0.05)
        replaced_at = time.monotonic()
        replace_file(repo / "replaced" / "1" / "model.onnx", new_bytes)
        assert wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="replaced")).sha256
                        == hashlib.sha256(new_bytes).hexdigest(), SWAP_WITHIN_S)
        swapped_s = time.monotonic() - replaced_at
        assert not slow.done(), "the slow call should still be running at the swap"
        time.sleep(0.1)
        stop.set()
        for call in calls:
            call.result()
        in_flight = slow.result()
    # The slow call finished on the model object it started with
    assert predictions(in_flight)[0] == pytest.approx(predictions(old)[0], rel=1e-6)
    new = stub.Explain(request("replaced", X, budget_ms=500))
    np.testing.assert_allclose(predictions(new), 2 * predictions(old), rtol=1e-6)
    np.testing.assert_allclose(attributions(new), 2 * attributions(old), rtol=1e-5, atol=1e-9)
    kinds = set()
    for r in results:  # every call answered, each wholly by one of the two files
        ratio = predictions(r) / predictions(old)
        assert np.allclose(ratio, 1, rtol=1e-6) or np.allclose(ratio, 2, rtol=1e-6), ratio
        kinds.add(round(float(ratio[0])))
        gap = attributions(r).sum(axis=1) - (predictions(r) - [row.base_values[0]
                                                               for row in r.rows])
        assert np.max(np.abs(gap)) < 1e-4
    assert kinds == {1, 2}, "calls should have run both before and after the swap"
    assert reloads(app, "replaced", "loaded") == 1 and reloads(app, "replaced", "failed") == 0
    assert swapped_s < SWAP_WITHIN_S
    print(f"replaced model.onnx served after {swapped_s:.2f} s; {len(results)} calls meanwhile")


def test_a_broken_replacement_keeps_the_old_file_serving_and_says_so(
        app: Sidelight, stub: pb_grpc.ExplainerStub, repo: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    before = stub.GetModel(pb.GetModelRequest(model="broken"))
    answer = predictions(stub.Explain(request("broken", X)))
    path = repo / "broken" / "1" / "model.onnx"
    good = path.read_bytes()
    with caplog.at_level(logging.INFO, logger="service.plane.reloader"):
        path.write_bytes(good[: len(good) // 2])  # truncated, written in place
        assert wait_for(lambda: reloads(app, "broken", "failed") == 1, SWAP_WITHIN_S)
        time.sleep(3 * INTERVAL_S)  # later looks do not retry the same broken file
    info = stub.GetModel(pb.GetModelRequest(model="broken"))
    assert info.state == "READY" and info.sha256 == before.sha256 and not info.error
    note = next(n for n in info.notes if n.startswith("reload:"))
    assert "failed to load" in note and "still serving the file loaded before" in note
    assert before.sha256[:16] in note
    np.testing.assert_array_equal(predictions(stub.Explain(request("broken", X))), answer)
    lines = [r for r in caplog.records if "broken" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.ERROR
    assert "goes on serving" in lines[0].getMessage()
    assert reloads(app, "broken", "failed") == 1 and reloads(app, "broken", "loaded") == 0
    text = generate_latest(app.metrics.registry).decode()
    assert 'sidelight_model_reloads_total{model="broken",outcome="failed"} 1.0' in text
    assert 'sidelight_model_ready{model="broken",version="1"} 1.0' in text
    # A good file repairs it: the note goes, the new file serves
    replace_file(path, scaled_model(3.0))
    assert wait_for(lambda: reloads(app, "broken", "loaded") == 1, SWAP_WITHIN_S)
    info = stub.GetModel(pb.GetModelRequest(model="broken"))
    assert not [n for n in info.notes if n.startswith("reload:")]
    np.testing.assert_allclose(predictions(stub.Explain(request("broken", X))), 3 * answer,
                               rtol=1e-6)


def test_a_new_version_directory_becomes_the_newest_and_a_removed_one_goes(
        app: Sidelight, stub: pb_grpc.ExplainerStub, repo: Path) -> None:
    answer = predictions(stub.Explain(request("versions", X)))
    staging = repo.parent / f"{repo.name}-staging"  # same file system: rename is atomic
    staging.mkdir()
    (staging / "model.onnx").write_bytes(scaled_model(2.0))
    staging.rename(repo / "versions" / "2")
    assert wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="versions")).version == "2",
                    SWAP_WITHIN_S)
    info = stub.GetModel(pb.GetModelRequest(model="versions"))
    assert list(info.versions) == ["1", "2"] and info.background_rows > 0
    r = stub.Explain(request("versions", X))
    assert r.version == "2"
    np.testing.assert_allclose(predictions(r), 2 * answer, rtol=1e-6)
    r1 = stub.Explain(request("versions", X, version="1"))
    np.testing.assert_array_equal(predictions(r1), answer)
    text = generate_latest(app.metrics.registry).decode()  # drift: the served version only
    assert text.count('sidelight_drift_window_rows{model="versions"}') == 1
    shutil.rmtree(repo / "versions" / "2")
    assert wait_for(lambda: reloads(app, "versions", "removed") == 1, SWAP_WITHIN_S)
    info = stub.GetModel(pb.GetModelRequest(model="versions"))
    assert info.version == "1" and list(info.versions) == ["1"]
    code, details = code_of(lambda: stub.Explain(request("versions", X, version="2")))
    assert code == grpc.StatusCode.NOT_FOUND and "version" in details
    assert 'model="versions",version="2"' not in generate_latest(app.metrics.registry).decode()


def test_a_failed_new_version_leaves_the_older_one_serving(
        app: Sidelight, stub: pb_grpc.ExplainerStub, repo: Path) -> None:
    (repo / "removed" / "7").mkdir()
    (repo / "removed" / "7" / "model.onnx").write_bytes(b"not an onnx file")
    assert wait_for(lambda: reloads(app, "removed", "failed") == 1, SWAP_WITHIN_S)
    info = stub.GetModel(pb.GetModelRequest(model="removed"))
    assert info.version == "1" and list(info.versions) == ["1", "7"]
    assert any(n.startswith("version 7 failed to load") for n in info.notes)
    failed = stub.GetModel(pb.GetModelRequest(model="removed", version="7"))
    assert failed.state == "FAILED" and failed.error
    assert stub.Explain(request("removed", X)).version == "1"
    shutil.rmtree(repo / "removed")  # the whole model goes
    assert wait_for(lambda: "removed" not in {
        m.name for m in stub.ListModels(pb.ListModelsRequest()).models}, SWAP_WITHIN_S)
    code, _ = code_of(lambda: stub.GetModel(pb.GetModelRequest(model="removed")))
    assert code == grpc.StatusCode.NOT_FOUND
    assert reloads(app, "removed", "removed") == 2  # versions 1 and 7


def test_a_changed_explain_yaml_is_picked_up_and_a_broken_one_refused(
        app: Sidelight, stub: pb_grpc.ExplainerStub, repo: Path) -> None:
    path = repo / "configured" / "explain.yaml"
    before = stub.Explain(request("configured", X, seed=5))
    assert stub.Explain(request("configured", X, seed=5)).cached  # the result cache has it
    config = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**config, "class_names": ["progression"]}))
    assert wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="configured"))
                    .output_names == ["progression"], SWAP_WITHIN_S)
    after = stub.Explain(request("configured", X, seed=5))  # same file, new explain.yaml:
    assert not after.cached and list(after.output_names) == ["progression"]  # not the old answer
    assert list(before.output_names) == ["variable"]
    np.testing.assert_array_equal(attributions(after), attributions(before))
    config["features"] = [f"{f}_v2" for f in config["features"]]
    config["budget_ms"] = 150
    path.write_text(yaml.safe_dump(config))
    assert wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="configured"))
                    .feature_names[0] == "age_v2", SWAP_WITHIN_S)
    info = stub.GetModel(pb.GetModelRequest(model="configured"))
    assert info.default_budget_ms == 150 and list(info.output_names) == ["variable"]
    assert stub.Explain(request("configured", X)).feature_names[0] == "age_v2"
    path.write_text("features: [unclosed\n")
    assert wait_for(lambda: reloads(app, "configured", "failed") == 1, SWAP_WITHIN_S)
    info = stub.GetModel(pb.GetModelRequest(model="configured"))
    assert info.state == "READY" and info.feature_names[0] == "age_v2"
    assert any("explain.yaml cannot be used" in n for n in info.notes)
    assert stub.Explain(request("configured", X)).feature_names[0] == "age_v2"


def test_a_changed_background_file_replaces_the_default_it_seeded(
        app: Sidelight, stub: pb_grpc.ExplainerStub, repo: Path) -> None:
    """The model directory's own files count as configuration: a new background.npy is
    stored as 'default' in place of the one the old file seeded."""
    name = "replaced"
    rows = background_of("diabetes_linear")[:25]
    np.save(repo / name / "background.npy", rows)
    assert wait_for(lambda: stub.GetModel(pb.GetModelRequest(model=name)).background_rows
                    == 25, SWAP_WITHIN_S)
    r = stub.Explain(request(name, X))
    assert r.background_rows == 25


def test_a_change_is_loaded_only_once_it_stopped_changing(tmp_path: Path) -> None:
    """settled(): a model differing from what is loaded is reloaded only when two looks in a
    row saw the same files (a copy in progress is never loaded half-written)."""
    model = tmp_path / "m"
    shutil.copytree(MODELS / "diabetes_linear", model)
    loaded = {"m": scan_model(model)}
    assert loaded["m"] is not None and [v for v, _ in loaded["m"].versions] == ["1"]
    (model / "1" / "model.onnx").write_bytes(b"half")
    first = scan_repository(tmp_path)
    assert first is not None and settled(loaded, loaded, first) == []  # still changing?
    second = scan_repository(tmp_path)
    assert second is not None and settled(loaded, first, second) == ["m"]
    assert settled(second, second, second) == []  # loaded: nothing to do
    assert scan_repository(tmp_path / "missing") is None  # unreadable: not "all removed"
    gone: dict[str, ModelStamp] = {}
    assert settled(loaded, gone, gone) == ["m"]


def test_a_server_started_without_models_serves_the_first_one_copied_in(
        tmp_path: Path) -> None:
    """Health follows the repository: NOT_SERVING with nothing loaded, SERVING once a model
    directory appears (copied elsewhere, then renamed in)."""
    root = tmp_path / "repo"
    root.mkdir()
    empty = start(settings_for(root, reload_interval_seconds=INTERVAL_S))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{empty.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)

            def status() -> int:
                return health.Check(health_pb2.HealthCheckRequest()).status

            assert status() == health_pb2.HealthCheckResponse.NOT_SERVING
            shutil.copytree(MODELS / "diabetes_linear", tmp_path / "staged")
            (tmp_path / "staged").rename(root / "diabetes_linear")
            assert wait_for(lambda: status() == health_pb2.HealthCheckResponse.SERVING,
                            SWAP_WITHIN_S)
            r = pb_grpc.ExplainerStub(channel).Explain(request("diabetes_linear", X))
            assert r.version == "1" and len(r.rows) == 3
    finally:
        empty.stop(grace=0)
    assert empty.reloader is not None and not empty.reloader.running


def test_replicas_sharing_redis_and_a_volume_both_move_to_the_new_file(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    """Two replicas on one repository and one Redis: after the file is replaced, both serve it,
    the stored default carries the new file's sha256, and neither serves an answer the shared
    result cache holds for the old file."""
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "diabetes_linear", root / "shared")
    apps = [start(settings_for(root, metrics_port=-1, drift_enabled=False,
                               redis_url=redis_server.url, redis_key_prefix="reload:",
                               reload_interval_seconds=INTERVAL_S)) for _ in range(2)]
    channels = [grpc.insecure_channel(f"127.0.0.1:{a.port}") for a in apps]
    try:
        stubs = [pb_grpc.ExplainerStub(c) for c in channels]
        old = stubs[0].Explain(request("shared", X, seed=9))
        assert stubs[1].Explain(request("shared", X, seed=9)).cached  # shared through Redis
        new_bytes = scaled_model(2.0)
        new_sha = hashlib.sha256(new_bytes).hexdigest()
        replace_file(root / "shared" / "1" / "model.onnx", new_bytes)
        for stub in stubs:
            assert wait_for(lambda s=stub: s.GetModel(pb.GetModelRequest(model="shared"))
                            .sha256 == new_sha, SWAP_WITHIN_S)
        for stub in stubs:
            r = stub.Explain(request("shared", X, seed=9))
            np.testing.assert_allclose(predictions(r), 2 * predictions(old), rtol=1e-6)
        stored = stubs[0].GetBackground(pb.GetBackgroundRequest(model="shared"))
        assert stored.model_sha256 == new_sha
    finally:
        for channel in channels:
            channel.close()
        for a in apps:
            a.stop(grace=0)


def test_looks_by_hand_settle_and_an_emptied_repository_unloads_nothing(
        tmp_path: Path) -> None:
    """With the interval at 0 nothing looks by itself: poll() by hand shows that a change is
    loaded on the second look that sees it unchanged, and that a repository found empty keeps
    its models (a volume that went away is not every model removed)."""
    root = tmp_path / "repo"
    shutil.copytree(MODELS / "diabetes_linear", root / "m")
    app = start(settings_for(root, reload_interval_seconds=0, metrics_port=-1,
                             drift_enabled=False))
    try:
        assert app.reloader is not None and not app.reloader.running
        replace_file(root / "m" / "1" / "model.onnx", scaled_model(2.0))
        assert app.reloader.poll() == []  # first sight: may still be changing
        done = app.reloader.poll()
        assert [(o.version, o.outcome) for r in done for o in r.outcomes] == [("1", "loaded")]
        assert app.reloader.poll() == []  # loaded: nothing more to do
        shutil.move(root / "m", tmp_path / "away")
        assert app.reloader.poll() == [] and app.reloader.poll() == []
        assert app.data_plane().repo.get("m").sha256 == hashlib.sha256(
            scaled_model(2.0)).hexdigest()
    finally:
        app.stop(grace=0)
