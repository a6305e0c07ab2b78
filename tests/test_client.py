"""`sidelight.client` against real servers: DataFrames in and out, shap's shapes, images and
texts, the background RPCs, retries of shed and unavailable calls, TLS and a token."""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import matplotlib
import numpy as np
import onnx
import pandas as pd
import pytest

from service.api.server import Sidelight, start
from service.cli import main
from service.client.inputs import Inputs
from sidelight.client import CallError, Client, Explanation, Retry
from sidelight.v1 import explainer_pb2 as pb
from sidelight.v1 import explainer_pb2_grpc as pb_grpc
from tests.conftest import MODELS, background_of, settings_for

matplotlib.use("Agg")  # shap's plots use pyplot


@pytest.fixture(scope="module")
def client(app: Sidelight) -> Iterator[Client]:
    with Client(f"127.0.0.1:{app.port}") as c:  # no deadline: a deadline sets the budget
        yield c


def test_a_dataframe_round_trips(client: Client) -> None:
    """Columns are matched by name (any order, extra columns ignored); to_frame() has one
    record per row and output with every attribution, its standard error, base and prediction."""
    X = background_of("breast_cancer_gbdt")[:5]
    names = list(client.model("breast_cancer_gbdt").feature_names)
    df = pd.DataFrame(X, columns=names)[names[::-1]].assign(patient_id=np.arange(5))
    by_array = client.explain("breast_cancer_gbdt", X, method="tree")
    by_frame = client.explain("breast_cancer_gbdt", df, method="tree")
    np.testing.assert_array_equal(by_frame.values, by_array.values)
    assert by_frame.values.shape == (5, 1, 30) and by_frame.method == "tree"
    np.testing.assert_array_equal(by_frame.data, X)
    frame = by_frame.to_frame()
    assert list(frame.columns) == ["row", "output", *names, *(f"{n}_se" for n in names),
                                   "base_value", "prediction"]
    assert list(frame["row"]) == [0, 1, 2, 3, 4] and set(frame["output"]) == {"benign"}
    np.testing.assert_array_equal(frame[names].to_numpy(), by_array.values[:, 0, :])
    np.testing.assert_allclose(frame[names].sum(axis=1), frame.prediction - frame.base_value,
                               atol=1e-6)
    with pytest.raises(ValueError, match="missing 'mean radius'"):
        client.explain("breast_cancer_gbdt", df.drop(columns=["mean radius"]))


def linear_shap(X: np.ndarray) -> object:
    """shap's own LinearExplainer on the ONNX LinearRegressor's coefficients."""
    import shap

    node = onnx.load(MODELS / "diabetes_linear" / "1" / "model.onnx").graph.node[0]
    attrs = {a.name: np.array(a.floats) for a in node.attribute}
    masker = shap.maskers.Independent(background_of("diabetes_linear"), max_samples=100)
    return shap.LinearExplainer((attrs["coefficients"], float(attrs["intercepts"][0])),
                                masker)(X)


def test_to_shap_gives_shaps_shapes_and_numbers(client: Client) -> None:
    import matplotlib.pyplot as plt
    import shap

    X = background_of("diabetes_linear")[:4]
    ours = client.explain("diabetes_linear", X, method="linear").to_shap()
    theirs = linear_shap(X)
    assert isinstance(ours, shap.Explanation)
    assert ours.values.shape == theirs.values.shape == (4, 10)  # type: ignore[attr-defined]
    assert ours.base_values.shape == theirs.base_values.shape == (4,)  # type: ignore[attr-defined]
    assert ours.data.shape == (4, 10) and ours.feature_names[2] == "bmi"
    np.testing.assert_allclose(ours.values, theirs.values, rtol=1e-4, atol=1e-3)  # type: ignore[attr-defined]
    np.testing.assert_allclose(ours.base_values, theirs.base_values, rtol=1e-5)  # type: ignore[attr-defined]
    two = client.explain("breast_cancer_logreg", background_of("breast_cancer_logreg")[:3],
                         classes=[0, 1], scale="identity").to_shap()
    assert two.values.shape == (3, 30, 2) and two.base_values.shape == (3, 2)
    assert two.output_names == ["malignant", "benign"]
    shap.plots.waterfall(ours[0], show=False)  # shap's plots accept them
    shap.plots.beeswarm(ours, show=False)
    shap.plots.waterfall(two[0, :, 1], show=False)
    plt.close("all")


def test_images_give_maps_shaped_like_the_input(client: Client) -> None:
    X = np.load(MODELS / "digits_cnn" / "background.npy")[:2]  # (2, 1, 8, 8)
    e = client.explain("digits_cnn", X, grid=2, baseline_kind="blur", blur_sigma=1.5)
    assert e.values.shape == (2, 10, 4) and e.maps["image"].shape == (2, 10, 1, 8, 8)
    assert e.modality == "image" and e.baseline == "blur (sigma 1.5 px)"
    assert e.feature_names == ("patch 0,0", "patch 0,1", "patch 1,0", "patch 1,1")
    np.testing.assert_array_equal(e.maps["image"][:, :, 0, :4, 4:],  # patch 0,1's pixels
                                  np.broadcast_to(e.values[:, :, 1, None, None], (2, 10, 4, 4)))
    assert e.to_shap().values.shape == (2, 1, 8, 8, 10)
    one = client.explain("digits_cnn", X[0])  # one image without the batch axis
    assert one.values.shape[0] == 1


def test_texts_are_tokenized_and_aligned_by_position(client: Client) -> None:
    e = client.explain("text_sentiment", ["not bad", "a really tedious film"])
    assert e.values.shape == (2, 1, 16) and e.feature_names[3] == "tokens[3]"
    assert e.labels[0][:3] == ("not", "bad", "") and e.labels[1][2] == "tedious"
    assert np.all(e.values[0, 0, 2:] == 0) and e.values[1, 0, 2] < -0.1
    np.testing.assert_allclose(e.values.sum(axis=2), e.predictions - e.base_values, atol=1e-9)
    np.testing.assert_array_equal(e.inputs["tokens"][0, :3], [2, 15, 0])  # not, bad, pad
    assert e.to_shap().data[1, 2] == "tedious"
    with pytest.raises(ValueError, match="'flick' not in the vocabulary"):
        client.explain("text_sentiment", "a superb flick")
    with pytest.raises(ValueError, match="1 to 16 words"):
        client.explain("text_sentiment", " ".join(["good"] * 17))


def test_background_rpcs(client: Client) -> None:
    X = background_of("diabetes_linear")[:20]
    names = list(client.model("diabetes_linear").feature_names)
    put = client.put_background("diabetes_linear", pd.DataFrame(X, columns=names),
                                name="client-test")
    assert put.background.rows == 20 and list(put.background.feature_names) == names
    assert client.get_background("diabetes_linear", "client-test").sha256 == \
        put.background.sha256
    assert "client-test" in {b.name for b in client.list_backgrounds("diabetes_linear")}
    e = client.explain("diabetes_linear", X[:2], background="client-test", method="linear")
    assert e.background == "client-test" and e.background_rows == 20
    assert client.delete_background("diabetes_linear", "client-test")
    with pytest.raises(CallError) as info:
        client.get_background("diabetes_linear", "client-test")
    assert info.value.code == grpc.StatusCode.NOT_FOUND and info.value.attempts == 1


def test_a_budget_too_small_is_not_retried(client: Client) -> None:
    X = background_of("breast_cancer_mlp")[:1]
    with pytest.raises(CallError) as info:
        client.explain("breast_cancer_mlp", X, method="kernel", budget_ms=1)
    assert info.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and info.value.attempts == 1


def one_model(tmp_path: Path, name: str) -> Path:
    shutil.copytree(MODELS / name, tmp_path / name)
    return tmp_path


def test_calls_shed_by_a_busy_server_are_retried_until_served(tmp_path: Path) -> None:
    """max_in_flight=1 and four callers: without retries some are shed (RESOURCE_EXHAUSTED);
    with them every call is answered, and each retry is reported."""
    app = start(settings_for(one_model(tmp_path, "breast_cancer_mlp"), max_in_flight=1,
                             metrics_port=-1, drift_reference_rows=0, result_cache_size=0))
    X = background_of("breast_cancer_mlp")[:1]
    retries: list[str] = []

    def four(retry: Retry) -> list[str]:
        with Client(f"127.0.0.1:{app.port}", retry=retry, seed=1,
                    on_retry=lambda err, n, s: retries.append(err.code.name)) as c:
            def call(seed: int) -> str:
                try:
                    return c.explain("breast_cancer_mlp", X, method="permutation",
                                     budget_ms=150, seed=seed).method
                except CallError as err:
                    return err.code.name
            with futures.ThreadPoolExecutor(4) as pool:
                return list(pool.map(call, range(4)))
    try:
        assert "RESOURCE_EXHAUSTED" in four(Retry(attempts=1)) and not retries
        assert four(Retry(attempts=30, first_s=0.05, max_s=0.2)) == ["permutation"] * 4
        assert retries and set(retries) == {"RESOURCE_EXHAUSTED"}
    finally:
        app.stop(grace=0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_server_that_is_not_up_yet_is_waited_for(tmp_path: Path) -> None:
    port = free_port()
    started: list[Sidelight] = []
    later = threading.Timer(0.5, lambda: started.append(start(settings_for(
        one_model(tmp_path, "diabetes_linear"), port=port, metrics_port=-1))))
    retries: list[str] = []
    later.start()
    try:
        with Client(f"127.0.0.1:{port}", retry=Retry(attempts=40, first_s=0.05, max_s=0.3),
                    on_retry=lambda err, n, s: retries.append(err.code.name)) as c:
            e = c.explain("diabetes_linear", background_of("diabetes_linear")[:1])
        assert isinstance(e, Explanation) and e.method == "linear"
        assert retries and set(retries) == {"UNAVAILABLE"}
    finally:
        later.join()
        for app in started:
            app.stop(grace=0)


class Echo(pb_grpc.ExplainerServicer):
    """A stand-in server (Sidelight serves no TLS yet): ListModels names the token it got."""

    def ListModels(self, request: pb.ListModelsRequest,  # noqa: N802
                   context: grpc.ServicerContext) -> pb.ListModelsResponse:
        token = dict(context.invocation_metadata()).get("authorization", "")
        return pb.ListModelsResponse(models=[pb.ModelInfo(name=str(token))])


def openssl(*args: object) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)


def pki(folder: Path) -> dict[str, bytes]:
    """A CA, a server certificate for localhost and a client certificate, all PEM."""
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=ca",
            "-keyout", folder / "ca.key", "-out", folder / "ca.crt")
    (folder / "san").write_text("subjectAltName=DNS:localhost\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout",
                folder / f"{name}.key", "-out", folder / f"{name}.csr")
        openssl("x509", "-req", "-in", folder / f"{name}.csr", "-CA", folder / "ca.crt",
                "-CAkey", folder / "ca.key", "-CAcreateserial", "-days", "1", "-extfile",
                folder / "san", "-out", folder / f"{name}.crt")
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.suffix in (".crt", ".key")}


@pytest.fixture
def echo(tmp_path: Path) -> Iterator[tuple[int, dict[str, bytes]]]:
    """The stand-in server on localhost with TLS that requires a client certificate."""
    pem = pki(tmp_path)
    server = grpc.server(futures.ThreadPoolExecutor(2))
    pb_grpc.add_ExplainerServicer_to_server(Echo(), server)
    port = server.add_secure_port("localhost:0", grpc.ssl_server_credentials(
        [(pem["server.key"], pem["server.crt"])], root_certificates=pem["ca.crt"],
        require_client_auth=True))
    server.start()
    yield port, pem
    server.stop(grace=0)


def test_mutual_tls_and_a_token(echo: tuple[int, dict[str, bytes]]) -> None:
    port, pem = echo
    with Client(f"localhost:{port}", root_certificates=pem["ca.crt"], token="s3cret",
                certificate_chain=pem["client.crt"], private_key=pem["client.key"]) as c:
        assert c.models()[0].name == "Bearer s3cret"
    for without in ({}, {"root_certificates": pem["ca.crt"]}):  # plaintext; no client cert
        with Client(f"localhost:{port}", retry=Retry(attempts=1), **without) as plain, \
                pytest.raises(CallError, match="UNAVAILABLE"):
            plain.models()
    with pytest.raises(ValueError, match="go together"):
        Client("localhost:1", certificate_chain=pem["client.crt"])


def test_the_command_line_uses_tls_and_a_token(echo: tuple[int, dict[str, bytes]],
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    port, _ = echo
    files = [f"--tls-{kind}={tmp_path / name}" for kind, name in
             (("ca", "ca.crt"), ("cert", "client.crt"), ("key", "client.key"))]
    main(["models", "--address", f"localhost:{port}", *files, "--token", "s3cret"])
    assert capsys.readouterr().out.startswith("Bearer s3cret v")


def test_deadline_bounds_the_retries() -> None:
    """Nothing listens: the retries stop at the call's deadline, not after every attempt."""
    began = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", timeout=0.5,
                retry=Retry(attempts=100, first_s=0.05, max_s=0.1)) as c, \
            pytest.raises(CallError, match=r"UNAVAILABLE|DEADLINE_EXCEEDED"):
        c.explain_response("m", Inputs({"x": np.zeros((1, 1))}))
    assert time.monotonic() - began < 2.0
