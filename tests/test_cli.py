"""`sidelight explain` and `sidelight models` against a running server."""

from __future__ import annotations

import json

import pytest

from service.api.server import Sidelight
from service.cli import main
from tests.conftest import background_of


def test_explain_prints_a_table_and_json(app: Sidelight,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    row = ",".join(str(v) for v in background_of("diabetes_linear")[0])
    address = f"127.0.0.1:{app.port}"
    main(["explain", "--address", address, "--model", "diabetes_linear", f"--row={row}"])
    text = capsys.readouterr().out
    assert "diabetes_linear v1: linear" in text and "bmi" in text
    main(["explain", "--address", address, "--model", "diabetes_linear", f"--row={row}",
          f"--row={row}", "--method", "permutation", "--budget-ms", "50", "--json"])
    response = json.loads(capsys.readouterr().out)
    assert response["method"] == "permutation" and len(response["rows"]) == 2
    assert len(response["rows"][0]["attributions"]) == 10


def test_models_lists_every_model(app: Sidelight, capsys: pytest.CaptureFixture[str]) -> None:
    main(["models", "--address", f"127.0.0.1:{app.port}"])
    out = capsys.readouterr().out
    assert "breast_cancer_mlp v1 READY" in out and "diabetes_forest v1 READY" in out


def test_bad_rows_exit_with_a_message(app: Sidelight) -> None:
    with pytest.raises(SystemExit, match="--row"):
        main(["explain", "--address", f"127.0.0.1:{app.port}", "--model", "diabetes_linear",
              "--row", "1,2,3"])
    with pytest.raises(SystemExit, match="NOT_FOUND"):
        main(["explain", "--address", f"127.0.0.1:{app.port}", "--model", "nope", "--row", "1"])
