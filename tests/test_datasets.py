"""The Datasets service on real servers with the bundled models: permutation importance is the
pure algorithm's (itself scikit-learn's, tests/test_global.py), partial dependence equals
scikit-learn's and its ICE curves average to it, dataset-wide mean |phi| is the mean of the
Explain answers row by row, progress comes before the result, a cancelled call stops the
server's work, stored datasets, caps said in the notes, errors that name the field, roles, and
live importance from served answers, summed across replicas through Redis."""

from __future__ import annotations

import math
import time
import uuid
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import redis
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from sklearn.decomposition import PCA
from sklearn.inspection import partial_dependence as sk_partial_dependence

from explainers.base import Array, Evaluator
from explainers.global_.jobs import run
from explainers.global_.permutation_importance import permutation_importance
from service.api.server import Sidelight, start
from service.api.tensors import from_array
from service.client.wire import array
from service.plane.targets import resolve_target, target_fn
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import datasets_pb2_grpc as dpb_grpc
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for
from tests.test_global import OnnxRegressor

INVALID, NOT_FOUND = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
TOL = 1e-12


@pytest.fixture(scope="module")
def datasets(channel: grpc.Channel) -> dpb_grpc.DatasetsStub:
    return dpb_grpc.DatasetsStub(channel)


def blocks(job: dpb.DatasetJob, X: Array | None = None, labels: Array | None = None,
           chunk: int = 64) -> Iterator[dpb.DatasetRequest]:
    """The job, then X (rows, ...) as float32 tensors of `chunk` rows, labels alongside."""
    yield dpb.DatasetRequest(job=job)
    for i in range(0, 0 if X is None else len(X), chunk):
        r = dpb.DatasetRequest(inputs=[from_array("", np.asarray(X[i:i + chunk], np.float32))])
        if labels is not None:
            r.labels.CopyFrom(from_array("labels", labels[i:i + chunk]))
        yield r


def run_job(stub: dpb_grpc.DatasetsStub, job: dpb.DatasetJob, X: Array | None = None,
            labels: Array | None = None, chunk: int = 64,
            timeout: float = 60) -> tuple[list[dpb.DatasetProgress], dpb.DatasetResult]:
    """Every progress report and the result (which must come last, once)."""
    out = list(stub.ExplainDataset(blocks(job, X, labels, chunk), timeout=timeout))
    kinds = [o.WhichOneof("event") for o in out]
    assert kinds[-1] == "result" and kinds.count("result") == 1
    return [o.progress for o in out[:-1]], out[-1].result


def code_of(stub: dpb_grpc.DatasetsStub, requests: Iterator[dpb.DatasetRequest]) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        list(stub.ExplainDataset(requests, timeout=30))
    return info.value


def rows_of(name: str) -> Array:
    """A model's background rows as the float32 values the server reads (float64)."""
    return background_of(name).astype(np.float32).astype(np.float64)


def explained_fn(app: Sidelight, name: str, scale: str = "") -> Any:
    model = app.data_plane().repo.get(name)
    return target_fn(model, resolve_target(model, "", (), scale))


# ------------------------------------------------------------------ permutation importance


@pytest.mark.parametrize(("name", "metric", "scale"), [
    ("diabetes_forest", "r2", "identity"), ("breast_cancer_gbdt", "accuracy", "identity"),
    ("breast_cancer_gbdt", "", "logit")])
def test_permutation_importance_is_the_pure_algorithm(app: Sidelight,
                                                      datasets: dpb_grpc.DatasetsStub,
                                                      name: str, metric: str, scale: str) -> None:
    """Same function, rows, labels, seed and repeats: the server's importances are the pure
    algorithm's, whose permutations given scikit-learn's are scikit-learn's; accuracy is
    scored on probabilities (the identity scale) whatever the model's default scale."""
    X = rows_of(name)
    fn = explained_fn(app, name, scale)
    y: Array | None = fn(X)[:, 0] + np.random.default_rng(0).normal(0, 5, len(X))
    if metric == "accuracy":
        y = (fn(X)[:, 0] > 0.5).astype(np.int64)
        y[:10] = 1 - y[:10]
    elif not metric:
        y = None
    job = dpb.DatasetJob(model=name, kind="permutation_importance", seed=11,
                         permutation=dpb.PermutationOptions(metric=metric, repeats=3))
    _, result = run_job(datasets, job, X, y)
    pure = run(permutation_importance(Evaluator(fn), X, np.random.default_rng(11), y, metric,
                                      repeats=3))
    got = result.permutation
    assert got.metric == pure.metric == (metric or "mean_abs_change") and result.scale == scale
    np.testing.assert_allclose(array(got.importances), pure.importances, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.mean, pure.mean, rtol=0, atol=TOL)
    np.testing.assert_allclose(got.std_errors, pure.std_errors, rtol=0, atol=TOL)
    names = app.data_plane().repo.get(name).feature_names
    assert got.baseline_score == pure.baseline_score and tuple(result.labels) == names
    assert result.rows == result.dataset_rows == len(X) and not result.stopped
    assert result.cost.model_evaluations == len(X) * (1 + 3 * X.shape[1])


def test_an_evaluation_cap_stops_at_whole_repeats_and_says_so(
        datasets: dpb_grpc.DatasetsStub) -> None:
    X = rows_of("diabetes_forest")
    cap = len(X) * (1 + 3 * X.shape[1]) + 5
    job = dpb.DatasetJob(model="diabetes_forest", kind="permutation_importance",
                         max_evaluations=cap, permutation=dpb.PermutationOptions(repeats=6))
    _, result = run_job(datasets, job, X)
    assert result.stopped == "max_evaluations" and result.cost.budget_exhausted
    assert array(result.permutation.importances).shape == (10, 3)
    assert result.notes[0].startswith("stopped (max_evaluations)") and "3 of 6 repeats" in \
        result.notes[0]


# ---------------------------------------------------------------------- partial dependence


@pytest.mark.parametrize(("name", "features", "resolution"), [
    ("diabetes_forest", [2], 20), ("breast_cancer_gbdt", [0, 27], 8)])
def test_partial_dependence_equals_sklearn(app: Sidelight, datasets: dpb_grpc.DatasetsStub,
                                           name: str, features: list[int],
                                           resolution: int) -> None:
    """On the model's explained function (a classifier's logit of its class), scikit-learn's
    brute-force PDP and ICE over its default grid; the ICE curves average to the PDP."""
    X = rows_of(name)
    est = OnnxRegressor(explained_fn(app, name)).fit(X, np.zeros(len(X)))
    theirs = sk_partial_dependence(est, X, features, method="brute", kind="both",
                                   grid_resolution=resolution)
    job = dpb.DatasetJob(model=name, kind="partial_dependence", dependence=dpb.DependenceOptions(
        features=features, resolution=resolution, ice_rows=len(X)))
    _, result = run_job(datasets, job, X)
    got = result.dependence
    for axis, expected in zip(got.grid, theirs.grid_values, strict=True):
        np.testing.assert_array_equal(array(axis), expected)
    average, ice = array(got.average), array(got.individual)
    np.testing.assert_allclose(average, theirs.average, rtol=0, atol=TOL)
    np.testing.assert_allclose(ice, theirs.individual, rtol=0, atol=TOL)
    np.testing.assert_allclose(ice.mean(axis=1), average, rtol=0, atol=TOL)
    assert list(got.ice_rows) == list(range(len(X))) and list(got.features) == features
    names = app.data_plane().repo.get(name).feature_names
    assert list(result.labels) == [names[f] for f in features]


def test_a_stored_dataset_is_the_same_as_its_rows_streamed(
        datasets: dpb_grpc.DatasetsStub) -> None:
    """job.dataset names a stored background: the same answer as sending its rows; a row cap
    takes a seeded sample and says so."""
    options = dpb.DependenceOptions(features=[3], resolution=7)
    job = dpb.DatasetJob(model="diabetes_linear", kind="partial_dependence", dependence=options,
                         max_rows=40, seed=3)
    _, streamed = run_job(datasets, job, rows_of("diabetes_linear"))
    stored_job = dpb.DatasetJob()
    stored_job.CopyFrom(job)
    stored_job.dataset = "default"
    _, stored = run_job(datasets, stored_job)
    assert streamed.dependence == stored.dependence and stored.rows == 40
    assert stored.dataset_rows == 100 and "max_rows: a seeded random sample of 40 of the 100 " \
        "rows was used" in stored.notes


# ------------------------------------------------------------------------ dataset Shapley


def test_dataset_mean_abs_phi_is_the_mean_of_the_explain_answers(
        stub: pb_grpc.ExplainerStub, datasets: dpb_grpc.DatasetsStub) -> None:
    """Each row explained on the Explain path: the job's per-row values are Explain's for the
    same row, and mean |phi|, its standard error and mean phi aggregate them."""
    name, X = "breast_cancer_gbdt", rows_of("breast_cancer_gbdt")[:24]
    job = dpb.DatasetJob(model=name, kind="shapley", seed=2, shapley=dpb.ShapleyOptions(
        method="tree", rows=True))
    _, result = run_job(datasets, job, X, chunk=10)
    got = result.shapley
    answers = np.stack([np.reshape(stub.Explain(pb.ExplainRequest(
        model=name, method="tree", seed=2, budget_ms=2000,
        inputs=[from_array("", X[i:i + 1].astype(np.float32))])).rows[0].attributions, (1, -1))
        for i in range(len(X))])  # (rows, outputs, features)
    assert list(got.row_indices) == list(range(len(X)))
    np.testing.assert_allclose(array(got.values), answers, rtol=0, atol=1e-9)
    np.testing.assert_allclose(array(got.mean_abs), np.abs(answers).mean(axis=0), atol=1e-9)
    se = np.abs(answers).std(axis=0, ddof=1) / math.sqrt(len(X))
    np.testing.assert_allclose(array(got.mean_abs_se), se, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(array(got.mean), answers.mean(axis=0), atol=1e-9)
    np.testing.assert_array_equal(array(got.feature_values), X)
    assert list(got.methods) == ["tree"] and result.scale == "logit" and len(result.labels) == 30


def test_dataset_shapley_interactions_and_aggregates_only(
        datasets: dpb_grpc.DatasetsStub) -> None:
    job = dpb.DatasetJob(model="diabetes_forest", kind="shapley", max_rows=6,
                         shapley=dpb.ShapleyOptions(method="tree", interactions=True))
    _, result = run_job(datasets, job, rows_of("diabetes_forest"))
    got = result.shapley
    assert array(got.interactions).shape == (1, 10, 10) and not got.HasField("values")
    assert len(got.row_indices) == 0 and result.rows == 6


# ------------------------------------------------------------------------------ projection


def test_projection_of_the_inputs_equals_sklearn_pca(app: Sidelight,
                                                     datasets: dpb_grpc.DatasetsStub) -> None:
    X = rows_of("breast_cancer_mlp")
    job = dpb.DatasetJob(model="breast_cancer_mlp", kind="projection",
                         projection=dpb.ProjectionOptions(components=3))
    _, result = run_job(datasets, job, X)
    got = result.projection
    theirs = PCA(n_components=3, svd_solver="full").fit(X)
    np.testing.assert_allclose(array(got.coordinates), theirs.transform(X), atol=1e-8)
    np.testing.assert_allclose(got.explained_variance_ratio, theirs.explained_variance_ratio_,
                               atol=1e-12)
    np.testing.assert_allclose(array(got.predictions), explained_fn(app, "breast_cancer_mlp")(X),
                               atol=TOL)
    assert got.layer == "" and got.method == "pca"


def test_projection_of_a_layer(app: Sidelight, datasets: dpb_grpc.DatasetsStub) -> None:
    """A hidden layer's activations, computed by an exposed copy of the graph, projected."""
    from explainers.layers.graph import Exposed, tensors

    model = app.data_plane().repo.get("digits_cnn")
    layer = [t.name for t in tensors(model.onnx.proto) if t.op_type == "Relu"][-1]
    X = background_of("digits_cnn")[:40]
    job = dpb.DatasetJob(model="digits_cnn", kind="projection",
                         projection=dpb.ProjectionOptions(layer=layer))
    _, result = run_job(datasets, job, X)
    feeds = model.onnx.layout.feeds(X.reshape(40, -1))
    acts = Exposed(model.onnx.proto, [layer]).run(feeds)[layer].reshape(40, -1)
    theirs = PCA(n_components=2, svd_solver="full").fit(acts.astype(np.float64))
    np.testing.assert_allclose(array(result.projection.coordinates),
                               theirs.transform(acts.astype(np.float64)), atol=1e-6)
    assert result.projection.layer == layer


# ---------------------------------------------------------------- streaming, cancellation


def test_progress_arrives_before_the_result(datasets: dpb_grpc.DatasetsStub) -> None:
    job = dpb.DatasetJob(model="diabetes_forest", kind="partial_dependence",
                         dependence=dpb.DependenceOptions(features=[0], resolution=30))
    reports, result = run_job(datasets, job, rows_of("diabetes_forest"), chunk=25)
    stages = [r.stage for r in reports]
    assert stages[0] == "receiving" and "running" in stages
    assert stages == sorted(stages, key=["receiving", "running"].index)
    running = [r for r in reports if r.stage == "running"]
    assert running[0].done == 0 and running[0].remaining_ms == -1
    assert [r.done for r in running] == sorted(r.done for r in running)
    assert running[-1].done == running[-1].total == 100 and running[-1].unit == "rows"
    assert result.dependence.average.shape == [1, 30]


def test_a_cancelled_call_stops_the_servers_work(app: Sidelight,
                                                 datasets: dpb_grpc.DatasetsStub) -> None:
    """A 2-D PDP of a million evaluations: cancelled after its first reports, the server's
    model calls stop and the call leaves the in-flight count."""
    owner = app.dataset_plane()
    job = dpb.DatasetJob(model="breast_cancer_gbdt", kind="partial_dependence", budget_ms=60000,
                         dependence=dpb.DependenceOptions(features=[0, 1], resolution=100,
                                                          ice_rows=-1))
    call = datasets.ExplainDataset(blocks(job, rows_of("breast_cancer_gbdt")), timeout=60)
    for message in call:
        if message.progress.stage == "running" and message.progress.done > 0:
            break
    assert owner.evaluated > 0 and owner.running == 1
    call.cancel()
    time.sleep(0.3)
    before = owner.evaluated
    time.sleep(0.6)
    assert owner.evaluated == before and owner.running == 0
    assert before < 100 * 100 * 100 and app.data_plane()._in_flight == 0


def test_jobs_are_cancelled_and_refused_when_the_server_stops(tmp_path: Path) -> None:
    """A running job is in-flight work: cancel_all ends it (CANCELLED) and drain refuses new
    ones (UNAVAILABLE: another replica will answer)."""
    app = start(settings_for(one_model(tmp_path), metrics_port=-1, drift_enabled=False))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = dpb_grpc.DatasetsStub(ch)
            X = np.tile(background_of("diabetes_linear"), (20, 1))  # 2,000 rows
            job = dpb.DatasetJob(model="diabetes_linear", kind="partial_dependence",
                                 dependence=dpb.DependenceOptions(features=[0, 2],
                                                                  resolution=256))
            call = stub.ExplainDataset(blocks(job, X, chunk=256), timeout=60)
            for message in call:
                if message.progress.stage == "running":
                    break
            app.data_plane().cancel_all("the server is stopping")
            with pytest.raises(grpc.RpcError) as info:
                list(call)
            assert info.value.code() == grpc.StatusCode.CANCELLED
            app.data_plane().drain()
            err = code_of(stub, blocks(job, X[:10]))
            assert err.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        app.stop(grace=0)


# ------------------------------------------------------------------------------ errors


def _job(**fields: Any) -> dpb.DatasetJob:
    values = {"model": "diabetes_forest", "kind": "partial_dependence",
              "dependence": dpb.DependenceOptions(features=[0])}
    values.update(fields)
    return dpb.DatasetJob(**values)


X10 = background_of("diabetes_forest")[:10]
BAD = {
    "kind": (blocks(_job(kind="bogus"), X10), INVALID, "job.kind"),
    "model": (blocks(_job(model="nope"), X10), NOT_FOUND, "model"),
    "labels missing": (blocks(_job(kind="permutation_importance", permutation=dpb.
                                   PermutationOptions(metric="r2")), X10), INVALID, "labels"),
    "labels length": (blocks(_job(kind="permutation_importance"), X10, np.zeros(3)), INVALID,
                      "labels"),
    "features": (blocks(_job(dependence=dpb.DependenceOptions()), X10), INVALID,
                 "dependence.features"),
    "dataset": (blocks(_job(dataset="nope")), NOT_FOUND, "job.dataset"),
    "dataset and rows": (blocks(_job(dataset="default"), X10), INVALID, "job.dataset"),
    "no job": (iter([dpb.DatasetRequest(inputs=[from_array("", X10)])]), INVALID, "job"),
    "no rows": (blocks(_job()), INVALID, "inputs"),
    "shape": (blocks(_job(), X10[:, :4]), INVALID, "inputs[0].shape"),
    "budget": (blocks(_job(budget_ms=-1)), INVALID, "job.budget_ms"),
    "max_rows": (blocks(_job(max_rows=1), X10), INVALID, "job.max_rows"),
    "metric": (blocks(_job(kind="permutation_importance", permutation=dpb.PermutationOptions(
        metric="f1")), X10), INVALID, "permutation.metric"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_jobs_are_refused_naming_the_field(datasets: dpb_grpc.DatasetsStub,
                                               case: str) -> None:
    requests, code, field = BAD[case]
    err = code_of(datasets, requests)
    assert err.code() == code and err.details().startswith(field), err.details()


def test_a_job_in_a_later_message_and_undecodable_bytes(channel: grpc.Channel) -> None:
    """Later messages carry rows only; bytes that are no DatasetRequest are INVALID_ARGUMENT
    naming the message, not INTERNAL."""
    method = channel.stream_stream("/sidelight.v1.Datasets/ExplainDataset",
                                   request_serializer=lambda b: b,
                                   response_deserializer=dpb.DatasetResponse.FromString)
    first = dpb.DatasetRequest(job=_job()).SerializeToString()
    for second, message in ((first, "job: only in the first message"),
                            (b"\xff\xff\xff", "request: message 1 of the stream could not be "
                                              "decoded as sidelight.v1.DatasetRequest")):
        with pytest.raises(grpc.RpcError) as info:
            list(method(iter([first, second]), timeout=10))
        assert info.value.code() == INVALID and info.value.details().startswith(message)


# ----------------------------------------------------------------------- live importance


def one_model(folder: Path, name: str = "diabetes_linear") -> Path:
    (folder / name).symlink_to(MODELS / name, target_is_directory=True)
    return folder


def explain_rows(app: Sidelight, rows: list[Array]) -> list[Array]:
    """Explain each block of rows; their attributions (rows, features)."""
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        s = pb_grpc.ExplainerStub(ch)
        return [np.array([r.attributions for r in s.Explain(pb.ExplainRequest(
            model="diabetes_linear", inputs=[from_array("", x)], budget_ms=500)).rows])
            for x in rows]


def live(app: Sidelight) -> dpb.LiveImportance:
    with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
        return dpb_grpc.DatasetsStub(ch).GetLiveImportance(
            dpb.LiveImportanceRequest(model="diabetes_linear"), timeout=10)


def check_live(answer: dpb.LiveImportance, phi: Array, replicas: int) -> None:
    a = np.abs(phi)  # (rows, features)
    assert answer.rows == len(a) and answer.replicas == replicas
    np.testing.assert_allclose(answer.mean_abs, a.mean(axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(answer.std_errors, a.std(axis=0, ddof=1) / math.sqrt(len(a)),
                               rtol=1e-6, atol=1e-12)
    assert answer.window_seconds == 300 and len(answer.feature_names) == 10


def test_live_importance_is_the_mean_abs_phi_of_the_answers_served(tmp_path: Path) -> None:
    app = start(settings_for(one_model(tmp_path), metrics_port=-1))
    try:
        X = background_of("diabetes_linear")
        phi = explain_rows(app, [X[:2], X[2:5], X[5:6], X[2:5]])  # a repeat is served cached
        check_live(live(app), np.concatenate(phi), 1)
    finally:
        app.stop(grace=0)


@pytest.fixture
def shared_redis() -> Iterator[str]:
    """The Redis at 127.0.0.1:6379 (skip without it) and a key prefix of this test's own,
    whose keys are removed afterwards."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=0.5)
    try:
        client.ping()
    except redis.RedisError:
        pytest.skip("no Redis on 127.0.0.1:6379")
    prefix = f"test-live-{uuid.uuid4().hex[:12]}:"
    yield prefix
    for key in client.scan_iter(f"{prefix}*"):
        client.delete(key)


def test_live_importance_sums_the_replicas_through_redis(tmp_path: Path,
                                                         shared_redis: str) -> None:
    repo = one_model(tmp_path)
    apps = [start(settings_for(repo, metrics_port=-1, drift_enabled=False,
                               redis_url="redis://127.0.0.1:6379/0",
                               redis_key_prefix=shared_redis)) for _ in range(2)]
    try:
        X = background_of("diabetes_linear")
        first = explain_rows(apps[0], [X[:3], X[10:12]])
        second = explain_rows(apps[1], [X[20:24]])
        check_live(live(apps[1]), np.concatenate(second), 1)  # the first has not shared yet
        check_live(live(apps[0]), np.concatenate(first + second), 2)
        check_live(live(apps[1]), np.concatenate(first + second), 2)
    finally:
        for a in apps:
            a.stop(grace=0)


# ----------------------------------------------------------------------------------- roles
TOKEN = "explain-token-0123456789abcdef"


def status(fn: Any) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as err:
        return err.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def test_the_datasets_rpcs_need_the_explain_role(tmp_path: Path) -> None:
    """No token: UNAUTHENTICATED; a token with the explain role: served; reflection lists
    the service and health reports it."""
    tokens, repo = tmp_path / "tokens", tmp_path / "repo"
    tokens.write_text(f"frontend explain {TOKEN}\n")
    repo.mkdir()
    app = start(settings_for(one_model(repo), metrics_port=-1, tokens_path=tokens))
    try:
        with grpc.insecure_channel(f"127.0.0.1:{app.port}") as ch:
            stub = dpb_grpc.DatasetsStub(ch)
            for metadata, code in (((), grpc.StatusCode.UNAUTHENTICATED),
                                   ((("authorization", f"Bearer {TOKEN}"),), grpc.StatusCode.OK)):
                assert status(partial(stub.GetLiveImportance, dpb.LiveImportanceRequest(
                    model="diabetes_linear"), metadata=metadata, timeout=10)) == code
                assert status(lambda m=metadata: list(stub.ExplainDataset(
                    blocks(_job(model="diabetes_linear"), X10), metadata=m,
                    timeout=10))) == code
            services = reflection_pb2_grpc.ServerReflectionStub(ch).ServerReflectionInfo(iter([
                reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=10)
            names = [s.name for r in services for s in r.list_services_response.service]
            assert "sidelight.v1.Datasets" in names
            health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(
                service="sidelight.v1.Datasets"), timeout=10)  # open: probes carry no token
            assert health.status == health_pb2.HealthCheckResponse.SERVING
    finally:
        app.stop(grace=0)
