"""Every kind of plot is drawn, is a sane PNG, and matches its committed reference image
(tests/data/plots; regenerate with `python -m tests.plot_cases` after an intended change)."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread

from service.api.server import Sidelight
from service.client import plots
from sidelight.client import Client
from tests.conftest import MODELS, background_of
from tests.plot_cases import CASES, REFERENCES, half, tabular

TOLERANCE = 0.01  # mean |pixel difference| over RGB in [0, 1], at half resolution
PNG = b"\x89PNG\r\n\x1a\n"


def difference(png: bytes, name: str) -> float:
    got, want = half(png), imread(REFERENCES / f"{name}.png")[..., :3]
    assert got.shape == want.shape, f"{name}: {got.shape} against {want.shape}"
    return float(np.mean(np.abs(got - want)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_kind_of_plot_matches_its_reference(name: str, tmp_path: Path) -> None:
    path = plots.save(CASES[name](), tmp_path / f"{name}.png")
    data = path.read_bytes()
    assert data[:8] == PNG and 5_000 < len(data) < 400_000
    assert difference(data, name) <= TOLERANCE, \
        f"{name} differs from tests/data/plots/{name}.png; if intended: python -m tests.plot_cases"


def test_the_comparison_sees_a_changed_plot() -> None:
    """The error bars left out, or every sign flipped: the comparison fails."""
    e = tabular(1)
    without = replace(e, ci_low=e.values, ci_high=e.values)
    flipped = replace(e, values=-e.values, ci_low=-e.ci_high, ci_high=-e.ci_low)
    for changed in (without, flipped):
        assert difference(plots.png(plots.bar(changed)), "bar") > 3 * TOLERANCE


def test_figures_are_deterministic() -> None:
    assert plots.png(CASES["beeswarm"]()) == plots.png(CASES["beeswarm"]())


def test_real_answers_are_drawn(app: Sidelight) -> None:
    with Client(f"127.0.0.1:{app.port}") as c:
        answers = [c.explain("diabetes_linear", background_of("diabetes_linear")[:1]),
                   c.explain("diabetes_forest", background_of("diabetes_forest")[:40],
                             method="tree", budget_ms=5000),
                   c.explain("digits_cnn", np.load(MODELS / "digits_cnn" / "background.npy")[:2]),
                   c.explain("text_sentiment", ["not bad", "a really tedious film"])]
    for e in answers:
        data = plots.png(plots.summary(e))
        assert data[:8] == PNG and len(data) > 5_000
    tall = imread(io.BytesIO(plots.png(plots.summary(answers[2]))))
    assert tall.shape[0] == 2 * 320  # one band per image
