"""`sidelight explain` on files, texts and images against real servers: chunks, concurrency,
output formats, progress, failures and retries per chunk, terminal rendering."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from service.api.server import Sidelight, start
from service.cli import main
from service.client.batch import Progress
from sidelight.client import Client
from tests.conftest import MODELS, background_of, settings_for

MODEL = "breast_cancer_gbdt"


@pytest.fixture(scope="module")
def address(app: Sidelight) -> str:
    return f"127.0.0.1:{app.port}"


@pytest.fixture(scope="module")
def rows() -> np.ndarray:
    return np.tile(background_of(MODEL), (6, 1))  # (600, 30)


@pytest.fixture(scope="module")
def reference(address: str, rows: np.ndarray) -> np.ndarray:
    """Exact TreeSHAP of the rows, 200 per call: (600, 30)."""
    with Client(address) as c:
        return np.concatenate([c.explain(MODEL, rows[a:a + 200], method="tree",
                                         budget_ms=5000).values[:, 0]
                               for a in range(0, 600, 200)])


def names(address: str) -> list[str]:
    with Client(address) as c:
        return list(c.model(MODEL).feature_names)


def write_input(path: Path, rows: np.ndarray, columns: list[str]) -> None:
    """rows as .npy, or as .csv/.parquet with the columns reversed and an id column."""
    if path.suffix == ".npy":
        np.save(path, rows)
        return
    frame = pd.DataFrame(rows, columns=columns)[columns[::-1]].assign(id=np.arange(len(rows)))
    if path.suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        pq.write_table(pa.Table.from_pandas(frame), path)


def read_output(path: Path) -> pd.DataFrame:
    if path.suffix == ".npy":
        return pd.DataFrame(np.load(path, allow_pickle=False))
    return pd.read_csv(path) if path.suffix == ".csv" else pq.read_table(path).to_pandas()


@pytest.mark.parametrize(("source", "target"), [("npy", "parquet"), ("csv", "csv"),
                                                ("parquet", "npy")])
def test_a_file_is_explained_in_chunks_into_every_format(
        tmp_path: Path, address: str, rows: np.ndarray, reference: np.ndarray, source: str,
        target: str, capsys: pytest.CaptureFixture[str]) -> None:
    features = names(address)
    src, out = tmp_path / f"rows.{source}", tmp_path / f"results.{target}"
    write_input(src, rows, features)
    main(["explain", "--address", address, "--model", MODEL, "--method", "tree",
          "--budget-ms", "5000", "--input",
          str(src), "--out", str(out), "--chunk-rows", "128", "--concurrency", "3"])
    printed = capsys.readouterr()
    assert "wrote 600 rows" in printed.out and "explained 600/600 rows (100%)" in printed.err
    assert ("ignoring columns id" in printed.err) == (source != "npy")
    got = read_output(out)
    assert list(got.columns) == ["row", "output", *features, *(f"{f}_se" for f in features),
                                 "base_value", "prediction"]
    assert list(got["row"]) == list(range(600)) and set(got["output"]) == {"benign"}
    np.testing.assert_allclose(got[features].to_numpy(), reference, rtol=1e-12, atol=1e-12)
    assert np.all(got[[f"{f}_se" for f in features]].to_numpy() == 0)  # exact
    np.testing.assert_allclose(got[features].sum(axis=1), got.prediction - got.base_value,
                               atol=1e-6)
    assert not list(tmp_path.glob(".*partial*"))


def test_a_failing_chunk_is_reported_and_the_others_are_written(
        tmp_path: Path, address: str, rows: np.ndarray, reference: np.ndarray,
        capsys: pytest.CaptureFixture[str]) -> None:
    bad = rows.copy()
    bad[300, 4] = np.nan  # rows 256-511 are one chunk; the server refuses it
    np.save(tmp_path / "rows.npy", bad)
    out = tmp_path / "results.csv"
    with pytest.raises(SystemExit, match=r"1 chunk\(s\) failed; first: rows 256-511 failed: "
                                         r"INVALID_ARGUMENT: .*NaN"):
        main(["explain", "--address", address, "--model", MODEL, "--method", "tree",
          "--budget-ms", "5000",
              "--input", str(tmp_path / "rows.npy"), "--out", str(out)])
    assert "rows 256-511 failed: INVALID_ARGUMENT" in capsys.readouterr().err
    got = read_output(out)
    kept = [*range(256), *range(512, 600)]
    assert list(got["row"]) == kept
    np.testing.assert_allclose(got[names(address)].to_numpy(), reference[kept], atol=1e-12)


def test_shed_chunks_are_retried_and_the_retries_reported(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(MODELS / "breast_cancer_mlp", tmp_path / "repo" / "breast_cancer_mlp")
    app = start(settings_for(tmp_path / "repo", max_in_flight=1, metrics_port=-1,
                             drift_reference_rows=0, result_cache_size=0))
    np.save(tmp_path / "rows.npy", background_of("breast_cancer_mlp")[:4])
    try:
        main(["explain", "--address", f"127.0.0.1:{app.port}", "--model", "breast_cancer_mlp",
              "--method", "permutation", "--budget-ms", "100", "--input",
              str(tmp_path / "rows.npy"), "--out", str(tmp_path / "out.parquet"),
              "--chunk-rows", "1", "--concurrency", "4"])
    finally:
        app.stop(grace=0)
    err = capsys.readouterr().err
    assert "RESOURCE_EXHAUSTED: server busy" in err and "; retry 1 of 4 in " in err
    assert list(read_output(tmp_path / "out.parquet")["row"]) == [0, 1, 2, 3]


def test_progress_on_a_terminal_and_in_a_log() -> None:
    log, tty = io.StringIO(), io.StringIO()
    plain = Progress(1000, log, interactive=False, every_s=0.0)
    live = Progress(1000, tty, interactive=True)
    for p in (plain, live):
        p.advance(250)
        p.note("rows 250-499 failed: UNAVAILABLE: gone")
        p.advance(750)
        p.finish()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("explained 250/1,000 rows (25%), ") and "ETA" in lines[0]
    assert lines[1] == "rows 250-499 failed: UNAVAILABLE: gone"
    assert lines[-1].startswith("explained 1,000/1,000 rows (100%)")
    assert "\r\x1b[K1,000/1,000 rows (100%)" in tty.getvalue() and tty.getvalue().endswith("\n")


def test_texts_and_images_read_on_a_terminal(address: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    main(["explain", "--address", address, "--model", "text_sentiment", "--text", "not bad",
          "--text", "a really tedious film"])
    out = capsys.readouterr().out
    assert "row 1 · positive: prediction" in out
    tedious = next(line for line in out.splitlines() if line.strip().startswith("tedious"))
    assert tedious.split()[1].startswith("-0.") and tedious.endswith("█|")  # bar to the left
    np.save(tmp_path / "digit.npy", np.load(MODELS / "digits_cnn" / "background.npy")[:1])
    main(["explain", "--address", address, "--model", "digits_cnn", "--input",
          str(tmp_path / "digit.npy"), "--grid", "4", "--baseline", "blur:1.5"])
    out = capsys.readouterr().out
    assert "4 x 4 grid of 2 x 2-pixel patches" in out and "blur (sigma 1.5 px)" in out
    grid = out.split("cells, 9 = ")[1].splitlines()[1:9]
    assert all(len(line.split()) == 8 for line in grid)
    assert "+9" in "".join(grid) and "largest groups:" in out


def test_plot_and_report_from_the_command(address: str, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    row = ",".join(str(v) for v in background_of("diabetes_linear")[0])
    main(["explain", "--address", address, "--model", "diabetes_linear", f"--row={row}",
          "--plot", str(tmp_path / "one.png"), "--report", str(tmp_path / "one.html")])
    assert (tmp_path / "one.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (tmp_path / "one.html").read_text()
    assert page.count('src="data:image/png;base64,') == 1 and page.count("<table>") == 2
    assert "wrote" in capsys.readouterr().out


def test_bad_files_and_flags_exit_with_a_message(address: str, tmp_path: Path) -> None:
    frame = pd.DataFrame(background_of(MODEL)[:3], columns=names(address))
    frame.drop(columns=["mean radius"]).to_csv(tmp_path / "missing.csv", index=False)
    frame.to_csv(tmp_path / "rows.csv", index=False)
    base = ["explain", "--address", address, "--model", MODEL]
    with pytest.raises(SystemExit, match="missing 'mean radius'"):
        main([*base, "--input", str(tmp_path / "missing.csv")])
    with pytest.raises(SystemExit, match=r"--out results.xlsx: use one of \.csv"):
        main([*base, "--input", str(tmp_path / "rows.csv"), "--out", "results.xlsx"])
    frame.iloc[:, :1].to_csv(tmp_path / "short.parquet")
    with pytest.raises(SystemExit, match="sidelight: "):  # not a parquet file
        main([*base, "--input", str(tmp_path / "short.parquet")])
    frame.astype(object).assign(**{"mean texture": ["1", "n/a", "2"]}).to_csv(
        tmp_path / "text.csv", index=False)
    with pytest.raises(SystemExit, match=r"text\.csv line 3: could not convert string"):
        main([*base, "--input", str(tmp_path / "text.csv")])
    with pytest.raises(SystemExit, match="'flick' not in the vocabulary"):
        main(["explain", "--address", address, "--model", "text_sentiment", "--text", "flick"])
    with pytest.raises(SystemExit, match="--baseline"):
        main([*base, "--row", "1", "--baseline", "blur:x"])


@pytest.fixture
def json_rows() -> Iterator[str]:
    yield ",".join(str(v) for v in background_of("diabetes_linear")[0])


def test_json_prints_one_response(address: str, json_rows: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    main(["explain", "--address", address, "--model", "diabetes_linear", f"--row={json_rows}",
          "--json"])
    assert '"method": "linear"' in capsys.readouterr().out
    with pytest.raises(SystemExit, match="--json prints one response"):
        main(["explain", "--address", address, "--model", "diabetes_linear",
              f"--row={json_rows}", f"--row={json_rows}", "--chunk-rows", "1", "--json"])
