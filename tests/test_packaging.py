"""Every package of the source tree is in pyproject.toml's list, so a non-editable install (the
runtime image) ships all of it."""

from __future__ import annotations

import tomllib

from tests.conftest import ROOT


def test_every_package_is_installed() -> None:
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for top in ("explainers", "service") for p in (ROOT / top).rglob("__init__.py")}
    found |= {"sidelight", "sidelight.v1"}
    assert found == listed, f"missing {sorted(found - listed)}, stale {sorted(listed - found)}"
