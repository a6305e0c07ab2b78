"""A poisoned stored background and a poisoned background file each leave every replica able to
start and serve its other models: a real Redis and two server processes (issue 11, item 5)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import grpc
import numpy as np
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.api.server import start
from service.api.tensors import from_array
from service.models.onnx_model import OnnxModel
from service.store.backgrounds import DEFAULT_NAME, encode_array, make_meta, predictions_key
from service.store.redis import RedisOptions, RedisStore, meta_from_header
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import ROOT, background_of, settings_for
from tests.redis_process import RedisProcess, free_port, wait_for
from tests.test_server import code_of, request
from tests.test_startup import add_model, poisoned


def poison_derived_blob(url: str, models: Path, model: str) -> None:
    """Replace the shared f(background) of a model's default target by NaN: well framed and
    matching its sha256, as a buggy replica would have written it."""
    client = redis.Redis.from_url(url)
    sha = OnnxModel(models / model / "1" / "model.onnx").sha256
    background = f"sidelight:v1:bg:{model}:1:default"
    meta = meta_from_header(client.hget(background, "header"), background)  # type: ignore[arg-type]
    key = "sidelight:v1:" + predictions_key(meta.sha256, sha, "variable", (0,), "identity")
    assert client.exists(key)
    client.set(key, encode_array(np.full((meta.rows, 1), np.nan)))


def store_as_an_older_version_would(url: str, model: str, sha256: str, data: np.ndarray) -> None:
    """Write `default` straight into Redis with the store's own format, as a replica without
    the dtype-aware upload check did (that check now refuses 1e39 for a float32 model)."""
    store = RedisStore(RedisOptions(url))
    try:
        store.put(make_meta(model, "1", DEFAULT_NAME, data, "upload", sha256), data)
    finally:
        store.close()


@contextmanager
def replica_process(models: Path, url: str) -> Iterator[tuple[subprocess.Popen[bytes], int]]:
    """`python -m service.cli serve` on a free port, this worktree's code, SIGTERM at the end."""
    port = free_port()
    env = dict(os.environ, SIDELIGHT_REDIS_URL=url, SIDELIGHT_HOST="127.0.0.1",
               SIDELIGHT_DRIFT_REFERENCE_ROWS="2", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--models",
                             str(models), "--port", str(port), "--metrics-port", "-1"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        yield proc, port
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def serving(port: int) -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            status = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=1)
        except grpc.RpcError:
            return False
    return status.status == health_pb2.HealthCheckResponse.SERVING


def check_replica(port: int) -> None:
    """The poisoned stored default and the poisoned file are reported with the fix; the
    healthy model serves."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.ExplainerStub(channel)
        states = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
        assert {m.state for m in states.values()} == {"READY"}
        notes = " ".join(states["mlp"].notes)
        assert "'default'" in notes and "float32" in notes and "PutBackground" in notes
        row = background_of("breast_cancer_mlp")[:1]
        code, details = code_of(lambda: stub.Explain(request("mlp", row, budget_ms=300)))
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "'default'" in details and "PutBackground" in details
        assert "background.npy" in " ".join(states["bad_file"].notes)
        r = stub.Explain(request("linear", background_of("diabetes_linear")[:2], budget_ms=300))
        assert len(r.rows) == 2 and np.all(np.isfinite(r.rows[0].attributions))


def test_poisoned_stored_and_file_backgrounds_leave_every_replica_serving(
        tmp_path: Path, redis_server: RedisProcess) -> None:
    models = tmp_path / "models"
    mlp = add_model(models, "mlp", "breast_cancer_mlp", {})
    add_model(models, "linear", "diabetes_linear", {})
    add_model(models, "bad_file", "diabetes_linear", {}, poisoned("diabetes_linear", np.nan))
    url = redis_server.url
    first = start(settings_for(models, redis_url=url, metrics_port=-1))
    first.stop(grace=0)  # seeded every usable explain.yaml default into Redis
    sha = OnnxModel(mlp / "1" / "model.onnx").sha256
    store_as_an_older_version_would(url, "mlp", sha, poisoned("breast_cancer_mlp", 1e39))
    poison_derived_blob(url, models, "linear")  # a cache: recomputed, never used

    with replica_process(models, url) as (proc, port):
        inprocess = start(settings_for(models, redis_url=url, metrics_port=-1))
        try:
            check_replica(inprocess.port)
            assert wait_for(lambda: serving(port) or proc.poll() is not None, 60)
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            check_replica(port)
            good = background_of("breast_cancer_mlp")[:30].astype(np.float32)
            with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:  # the fix, on one
                pb_grpc.ExplainerStub(channel).PutBackground(pb.PutBackgroundRequest(
                    model="mlp", data=from_array("data", good)))
            with grpc.insecure_channel(f"127.0.0.1:{inprocess.port}") as channel:  # used by all
                stub = pb_grpc.ExplainerStub(channel)
                row = background_of("breast_cancer_mlp")[:1]
                assert wait_for(lambda: _explains(stub, row), 5)
                m = stub.GetModel(pb.GetModelRequest(model="mlp"))
                assert "'default'" not in " ".join(m.notes)
                assert wait_for(lambda: stub.GetModel(pb.GetModelRequest(model="mlp")).drift_active)
        finally:
            inprocess.stop(grace=0)


def _explains(stub: pb_grpc.ExplainerStub, row: np.ndarray) -> bool:
    try:
        return stub.Explain(request("mlp", row, budget_ms=300)).background_rows == 30
    except grpc.RpcError:
        return False
