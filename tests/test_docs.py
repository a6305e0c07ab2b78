"""The README's configuration table lists every setting, so the docs cannot drift silently."""

from __future__ import annotations

from service.config import Settings
from tests.conftest import ROOT


def test_every_setting_is_documented() -> None:
    readme = (ROOT / "README.md").read_text()
    missing = [f"SIDELIGHT_{name.upper()}" for name in Settings.model_fields
               if f"`SIDELIGHT_{name.upper()}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_ci_runs_exactly_the_readme_test_command() -> None:
    run = (ROOT / ".ci" / "run").read_text()
    commands = [line for line in run.splitlines() if line and not line.startswith("#")]
    assert "make test" in commands and "make test" in (ROOT / "README.md").read_text()
