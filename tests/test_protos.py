"""The committed generated code must be exactly what protos/generate.py produces."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT

GENERATED = ROOT / "protos" / "sidelight" / "v1"


def test_generated_code_is_current(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True)
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "the generator produced nothing"
    committed = sorted(p.relative_to(ROOT / "protos") for p in GENERATED.glob("*_pb2*"))
    assert fresh == committed, "generated file set differs: run `make protos`"
    for rel in fresh:
        assert (tmp_path / rel).read_bytes() == (ROOT / "protos" / rel).read_bytes(), \
            f"{rel} is stale: run `make protos` and commit the result"
