"""Explanations as text for a terminal: a table per row for tables, a signed heat grid for
images, the words with their scores and bars for texts."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from service.client.explanation import Explanation
from service.client.images import coarse, heat

MAX_CELLS = 32  # heat grid cells per axis; larger images are averaged over blocks
BAR = 20  # characters of the longest text bar
TOP = 5  # groups listed under a heat grid


def render(e: Explanation, outputs: Sequence[int] | None = None, max_rows: int = 20) -> str:
    """The header, notes and at most `max_rows` rows. `outputs`: the outputs to show (default:
    every output for tables and texts, the largest prediction for images)."""
    out = [header(e), *(f"note: {n}" for n in e.notes)]
    for i in range(min(len(e), max_rows)):
        shown = outputs if outputs is not None else \
            [e.top_output(i)] if e.modality == "image" else range(len(e.output_names))
        for k in shown:
            out.extend(ROWS.get(e.modality, table)(e, i, k))
    if len(e) > max_rows:
        out.append(f"... {len(e) - max_rows} more rows (write them all with --out FILE)")
    return "\n".join(out)


def header(e: Explanation) -> str:
    c = e.cost
    line = (f"{e.model} v{e.version}: {e.method}, {c.model_evaluations} evaluations, "
            f"{c.elapsed_ms:.1f} ms of {c.budget_ms:.0f} ms ({c.budget_source}), "
            f"background {e.background} ({e.background_rows} rows), scale {e.scale}")
    if e.modality != "tabular":
        line += f"\n{e.modality}: {e.grouping}; removed groups become {e.baseline}"
    return line


def title(e: Explanation, i: int, k: int) -> str:
    total = "sum of attributions" if e.additive else "attributions (not additive)"
    return (f"row {i} · {e.output_names[k]}: prediction {e.predictions[i, k]:.4g} = base "
            f"{e.base_values[i, k]:.4g} + {total}")


def table(e: Explanation, i: int, k: int) -> list[str]:
    """Features by decreasing |attribution|, each with its 95% interval half-width."""
    phi, half = e.values[i, k], (e.ci_high[i, k] - e.ci_low[i, k]) / 2
    return [title(e, i, k), *(f"  {e.feature_names[j]:<28} {phi[j]:+.4g} ± {half[j]:.2g}"
                              for j in np.argsort(-np.abs(phi), kind="stable"))]


def image(e: Explanation, i: int, k: int) -> list[str]:
    """The map as a grid of signed levels -9..+9 (of the largest |value|), then the top groups."""
    name, maps = next(iter(e.maps.items()), ("", None))
    lines = [title(e, i, k)]
    if maps is not None:
        grid = coarse(heat(maps[i, k]), MAX_CELLS)  # (H, W)
        scale = float(np.max(np.abs(grid))) or 1.0
        lines.append(f"  map of input {name!r}, {grid.shape[0]} x {grid.shape[1]} cells, "
                     f"9 = {scale:.3g}:")
        lines.extend("  " + " ".join(level(v / scale) for v in row) for row in grid)
    return lines + top_groups(e, i, k)


def level(v: float) -> str:
    n = int(np.rint(9 * v))
    return " ." if n == 0 else f"{n:+d}"


def top_groups(e: Explanation, i: int, k: int) -> list[str]:
    phi, half = e.values[i, k], (e.ci_high[i, k] - e.ci_low[i, k]) / 2
    order = np.argsort(-np.abs(phi), kind="stable")[:TOP]
    return ["  largest groups:", *(f"    {e.feature_names[j]:<24} {phi[j]:+.4g} ± {half[j]:.2g}"
                                   for j in order)]


def text(e: Explanation, i: int, k: int) -> list[str]:
    """Each word in order with its score, interval and a bar left (negative) or right."""
    phi, half = e.values[i, k], (e.ci_high[i, k] - e.ci_low[i, k]) / 2
    words = e.labels[i] if e.labels else e.feature_names
    used = [j for j, w in enumerate(words) if w]
    scale = float(np.max(np.abs(phi[used]))) if used else 0.0
    return [title(e, i, k), *(f"  {words[j]:<16} {phi[j]:+.4f} ± {half[j]:.2g}  "
                              f"{bar(phi[j], scale)}" for j in used)]


def bar(v: float, scale: float) -> str:
    n = round(BAR * abs(v) / scale) if scale > 0 else 0
    return f"{' ' * (BAR - n)}{'█' * n}|" if v < 0 else f"{' ' * BAR}|{'█' * n}"


ROWS = {"image": image, "text": text}
