"""Writes the README's pictures (docs/images/*.png): one of each kind of plot.

    python examples/docs_images.py

Explanations come from the bundled models through a real server started here; the dataset-wide
kinds (importance, PDP, decision regions, activations, attention, embedding) are drawn from the
fixed example data of tests/plot_cases.py until the server computes them."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "protos")]

from service.api.server import start  # noqa: E402
from service.client import Client, plots  # noqa: E402
from service.config import Settings  # noqa: E402
from tests import plot_cases  # noqa: E402

MODELS = ROOT / "examples" / "models"
OUT = ROOT / "docs" / "images"


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    app = start(Settings(models_dir=MODELS, port=0, metrics_port=-1, host="127.0.0.1"))
    try:
        with Client(f"127.0.0.1:{app.port}") as client:
            figures = explanations(client)
    finally:
        app.stop(grace=0)
    figures |= {name: plot_cases.CASES[name]() for name in (
        "permutation_importance", "pdp", "pdp_2d", "decision_regions", "activations",
        "attention", "embedding")}
    for name, fig in figures.items():
        print(small(plots.save(fig, OUT / f"{name}.png")))


def small(path: Path) -> Path:
    """The PNG with a 128-colour palette: a third of the bytes, the same picture to the eye."""
    from PIL import Image

    with Image.open(path) as image:
        palette = image.convert("RGB").quantize(colors=128)
    palette.save(path, optimize=True)
    return path


def explanations(client: Client) -> dict[str, plots.Figure]:
    cancer = np.load(MODELS / "breast_cancer_gbdt" / "background.npy")
    one = client.explain("breast_cancer_gbdt", cancer[:1], method="tree")
    many = client.explain("breast_cancer_gbdt", cancer, method="tree", budget_ms=5000)
    digits = np.load(MODELS / "digits_cnn" / "background.npy")[:2]
    return {
        "bar": plots.bar(one, max_features=10),
        "waterfall": plots.waterfall(one, max_features=10),
        "beeswarm": plots.beeswarm(many, max_features=10),
        "mean_attribution": plots.mean_attribution(many),
        "image": plots.image(client.explain("digits_cnn", digits), [0, 1]),
        "text": plots.text(client.explain("text_sentiment", [
            "the acting was not great but the music was really wonderful",
            "a really tedious film"]), [0, 1]),
    }


if __name__ == "__main__":
    main()
