"""The client's dataset-wide calls and `sidelight global ...` against the session's server:
DataFrames streamed in chunks give the raw RPC's answer, progress reaches the callback before
the call returns, and every result is drawn by the existing plots and reports."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pandas as pd
import pytest

from service.api.server import Sidelight
from service.cli import main
from service.client import Client, plots, report
from service.client import datasets as jobs
from sidelight.v1 import datasets_pb2 as dpb
from sidelight.v1 import datasets_pb2_grpc as dpb_grpc
from tests.conftest import background_of
from tests.test_datasets import run_job


@pytest.fixture(scope="module")
def client(app: Sidelight) -> Client:
    with Client(f"127.0.0.1:{app.port}") as c:
        yield c


@pytest.fixture(scope="module")
def frame(client: Client) -> pd.DataFrame:
    names = list(client.model("diabetes_forest").feature_names)
    return pd.DataFrame(background_of("diabetes_forest"), columns=names)


def test_permutation_importance_from_a_dataframe(client: Client, frame: pd.DataFrame,
                                                 channel: grpc.Channel) -> None:
    """Columns matched by name (an extra one ignored), rows streamed 16 at a time: the raw
    RPC's numbers; progress reports reach the callback."""
    y = pd.Series(np.linspace(0, 300, len(frame)))
    seen: list[dpb.DatasetProgress] = []
    shuffled = frame[frame.columns[::-1]].assign(extra=1.0)
    got = client.permutation_importance("diabetes_forest", shuffled, y, metric="mse",
                                        repeats=2, seed=4, chunk_rows=16,
                                        on_progress=seen.append)
    job = dpb.DatasetJob(model="diabetes_forest", kind="permutation_importance", seed=4,
                         permutation=dpb.PermutationOptions(metric="mse", repeats=2))
    _, raw = run_job(dpb_grpc.DatasetsStub(channel), job, frame.to_numpy(), y.to_numpy())
    np.testing.assert_array_equal(got.values, raw.permutation.mean)
    assert got.importances is not None and got.importances.shape == (10, 2)
    assert got.feature_names == tuple(frame.columns) and got.job is not None
    assert got.job.rows == 100 and seen and seen[0].stage == "receiving"
    assert plots.importance(got).get_axes()


def test_dependence_curves_and_surfaces_are_drawn(client: Client, frame: pd.DataFrame) -> None:
    curve = client.partial_dependence("diabetes_forest", frame, ["bmi"], resolution=12,
                                      ice_rows=5)
    assert isinstance(curve, jobs.Dependence) and curve.feature == "bmi"
    assert curve.ice is not None and curve.ice.shape == (5, 12) and curve.grid.shape == (12,)
    plots.partial_dependence(curve)
    X = background_of("breast_cancer_gbdt")
    regions = client.partial_dependence("breast_cancer_gbdt", X, [0, 27], resolution=6,
                                        classes=[0, 1], scale="identity", ice_rows=-1)
    assert isinstance(regions, jobs.Dependence2D) and regions.values.shape == (6, 6, 2)
    assert regions.class_names == ("malignant", "benign")
    plots.partial_dependence_2d(regions)
    report.Report("r").add(curve).add(regions)


def test_dataset_shapley_gives_a_beeswarm_and_an_importance(client: Client,
                                                           frame: pd.DataFrame) -> None:
    got = client.dataset_shapley("diabetes_forest", frame, method="tree", max_rows=20)
    assert got.explanation is not None and got.explanation.values.shape == (20, 1, 10)
    np.testing.assert_allclose(got.mean_abs, np.abs(got.explanation.values).mean(axis=0))
    assert got.explanation.data is not None and got.row_indices is not None
    np.testing.assert_array_equal(got.explanation.data, frame.to_numpy()[got.row_indices])
    plots.beeswarm(got.explanation)
    plots.importance(got.importance())
    assert "max_rows" in got.job.notes[0]


def test_projection_and_live_importance(client: Client, frame: pd.DataFrame) -> None:
    got = client.projection("diabetes_forest", frame)
    assert got.points.shape == (100, 2) and got.values is not None
    report.Report("r").add(got)
    live = client.live_importance("diabetes_forest")
    assert live.feature_names == tuple(frame.columns) and live.window_seconds > 0


def test_the_global_commands(app: Sidelight, tmp_path: Path,
                             capsys: pytest.CaptureFixture[str]) -> None:
    rows, labels = tmp_path / "rows.npy", tmp_path / "y.csv"
    np.save(rows, background_of("diabetes_forest"))
    labels.write_text("y\n" + "\n".join(str(v) for v in np.linspace(0, 300, 100)))
    address = ["--address", f"127.0.0.1:{app.port}", "--model", "diabetes_forest"]
    main(["global", "importance", *address, "--input", str(rows), "--labels", str(labels),
          "--repeats", "2", "--plot", str(tmp_path / "imp.png"),
          "--report", str(tmp_path / "imp.html")])
    out = capsys.readouterr().out
    assert "drop in r2" in out and "permutation_importance of diabetes_forest" in out
    assert (tmp_path / "imp.png").stat().st_size > 1000
    assert "<table>" in (tmp_path / "imp.html").read_text()
    main(["global", "dependence", *address, "--dataset", "default", "--features", "bmi",
          "--resolution", "5", "--plot", str(tmp_path / "pdp.png")])
    assert len(capsys.readouterr().out.splitlines()) >= 6
    main(["global", "shapley", *address, "--input", str(rows), "--max-rows", "8",
          "--plot", str(tmp_path / "swarm.png"), "--report", str(tmp_path / "s.html")])
    assert "mean |attribution|" in capsys.readouterr().out
    main(["global", "live", *address])
    assert "replica(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"INVALID_ARGUMENT: dependence\.features"):
        main(["global", "dependence", *address, "--dataset", "default", "--features", "99"])


def test_labels_must_match_the_rows(client: Client, frame: pd.DataFrame) -> None:
    with pytest.raises(ValueError, match="labels"):
        client.permutation_importance("diabetes_forest", frame, np.zeros(3))
