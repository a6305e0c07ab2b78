"""The base install is enough for the client: `sidelight.client` and the client commands work
in a process where the server's dependencies cannot be imported."""

from __future__ import annotations

import os
import subprocess
import sys

from service.api.server import Sidelight
from tests.conftest import ROOT

BLOCKED = ("onnxruntime", "onnx", "onnx_ad", "shap", "scipy", "pydantic", "pydantic_settings",
           "redis", "yaml", "prometheus_client", "sklearn", "numba", "explainers")
SCRIPT = """
import importlib.abc, json, sys
address, blocked = sys.argv[1], set(sys.argv[2].split(","))

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"{name} is blocked", name=name)
        return None

sys.meta_path.insert(0, Block())
for name in blocked:
    try:
        __import__(name)
        raise SystemExit(f"{name} was imported")
    except ModuleNotFoundError:
        pass

import numpy as np
import pandas as pd
from sidelight.client import Client
from service.cli import main

X = np.load("examples/models/diabetes_linear/background.npy")[:3]
with Client(address) as c:
    names = list(c.model("diabetes_linear").feature_names)
    by_array = c.explain("diabetes_linear", X)
    by_frame = c.explain("diabetes_linear", pd.DataFrame(X, columns=names))
    text = c.explain("text_sentiment", "not bad")
    frame = by_frame.to_frame()
main(["explain", "--address", address, "--model", "diabetes_linear",
      "--row=" + ",".join(map(str, X[0]))])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in blocked)
print(json.dumps({"same": bool(np.array_equal(by_array.values, by_frame.values)),
                  "shape": list(by_array.values.shape), "columns": len(frame.columns),
                  "text": text.labels[0][:2], "loaded": loaded}))
"""


def test_the_client_works_without_the_server_dependencies(app: Sidelight) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'protos'}"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, f"127.0.0.1:{app.port}",
                           ",".join(BLOCKED)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    table, result = done.stdout.rsplit("\n", 2)[:2]
    assert "diabetes_linear v1: linear" in done.stdout and "bmi" in table
    assert result == ('{"same": true, "shape": [3, 1, 10], "columns": 24, '
                      '"text": ["not", "bad"], "loaded": []}')
