"""A self-contained HTML report: the plots embedded as PNG data URIs, the numbers in tables,
no scripts and no external files, so it opens in any browser from disk or as an attachment."""

from __future__ import annotations

import base64
import html
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from service.client import plots
from service.client.explanation import Explanation
from service.client.results import (
    Activations,
    Attention,
    Embedding,
    Importance,
    PartialDependence,
    PartialDependence2D,
    shapley_importance,
)

CSS = """
body { font-family: sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; } h3 { font-size: 1em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: left; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; } figcaption { font-size: 0.85em; color: #555; }
img { max-width: 100%; height: auto; }
.note { background: #fff6d5; padding: 0.3em 0.6em; }
"""
Cell = str | float | int


class Report:
    """An HTML document built section by section."""

    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = [f"<h1>{html.escape(title)}</h1>"]

    def heading(self, text: str, level: int = 2) -> Report:
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")
        return self

    def paragraph(self, text: str, css: str = "") -> Report:
        attr = f' class="{css}"' if css else ""
        self.parts.append(f"<p{attr}>{html.escape(text)}</p>")
        return self

    def figure(self, fig: Figure, caption: str) -> Report:
        """A matplotlib figure as an embedded PNG with its caption as alt text."""
        data = base64.b64encode(plots.png(fig)).decode("ascii")
        width, height = (int(v) for v in fig.get_size_inches() * plots.DPI)
        self.parts.append(
            f'<figure><img src="data:image/png;base64,{data}" width="{width}" '
            f'height="{height}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")
        return self

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Cell]],
              caption: str = "") -> Report:
        """A table; numbers right-aligned with 4 significant digits."""
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        head = f"<thead><tr>{head}</tr></thead>" if head else ""
        body = "".join("<tr>" + "".join(cell(v) for v in r) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self.parts.append(f"<table>{cap}{head}<tbody>{body}</tbody></table>")
        return self

    def html(self) -> str:
        return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
                f"<title>{html.escape(self.title)}</title><style>{CSS}</style></head>"
                f"<body>{''.join(self.parts)}</body></html>\n")

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.html(), encoding="utf-8")
        return path

    def add(self, result: object) -> Report:
        """A dataset-wide result (importance, PDP, ...) as its plot and its numbers."""
        for kind, section in SECTIONS:
            if isinstance(result, kind):
                section(self, result)
                return self
        raise TypeError(f"no report section for {type(result).__name__}")


def cell(v: Cell) -> str:
    if isinstance(v, str):
        return f"<td>{html.escape(v)}</td>"
    return f'<td class="n">{v:.4g}</td>' if isinstance(v, float) else f'<td class="n">{v}</td>'


def explanation_report(e: Explanation, max_rows: int = 10) -> Report:
    """What was explained and how (the cost, the notes), then per row its picture and its
    numbers; with several tabular rows also the dataset-wide beeswarm and mean |attribution|."""
    r = Report(f"Sidelight explanation: {e.model} v{e.version}")
    r.table([], summary_rows(e), caption="request")
    for note in e.notes:
        r.paragraph(f"note: {note}", css="note")
    if len(e) > 1 and e.modality == "tabular":
        overall(r, e)
    for i in range(min(len(e), max_rows)):
        row_section(r, e, i)
    if len(e) > max_rows:
        r.paragraph(f"{len(e) - max_rows} more rows are not shown; `--out FILE` writes them all.")
    return r


def summary_rows(e: Explanation) -> list[list[Cell]]:
    c = e.cost
    return [["model", f"{e.model} v{e.version}"], ["method", e.method],
            ["rows x outputs", f"{len(e)} x {len(e.output_names)}"],
            ["outputs", ", ".join(e.output_names)], ["scale", e.scale],
            ["inputs read as", e.modality], ["players", e.grouping or "one group per feature"],
            ["removed features become", e.baseline or f"background {e.background!r}"],
            ["background", f"{e.background} ({e.background_rows} rows)"],
            ["model evaluations", c.model_evaluations],
            ["elapsed ms", c.elapsed_ms], ["budget ms", f"{c.budget_ms:.0f} ({c.budget_source})"],
            ["converged", str(c.converged)], ["budget exhausted", str(c.budget_exhausted)],
            ["additive", str(e.additive)], ["cached", str(e.cached)]]


def overall(r: Report, e: Explanation) -> None:
    for k in range(len(e.output_names)):
        r.heading(f"All {len(e)} rows · {e.output_names[k]}")
        r.figure(plots.beeswarm(e, k), f"attributions of every row to {e.output_names[k]}")
        section_importance(r, shapley_importance(e, k))


def shown_outputs(e: Explanation, row: int) -> list[int]:
    """Every output for tables and texts with up to 3; else the largest prediction."""
    if e.modality == "image" or len(e.output_names) > 3:
        return [e.top_output(row)]
    return list(range(len(e.output_names)))


def row_section(r: Report, e: Explanation, i: int) -> None:
    for k in shown_outputs(e, i):
        r.heading(f"Row {i} · {e.output_names[k]}: prediction {e.predictions[i, k]:.4g}, "
                  f"base value {e.base_values[i, k]:.4g}")
        picture = {"image": plots.image, "text": plots.text}.get(e.modality, plots.waterfall)
        if e.modality != "image" or e.maps:
            r.figure(picture(e, i, k), f"row {i}, {e.output_names[k]} ({e.method})")
        r.table(*attribution_table(e, i, k))


def attribution_table(e: Explanation, i: int, k: int) -> tuple[list[str], list[list[Cell]]]:
    """Players by decreasing |attribution| with value, standard error and 95% interval."""
    data = e.data  # (rows, features) values or words; None for groups of pixels
    order = [j for j in np.argsort(-np.abs(e.values[i, k]), kind="stable")
             if not e.labels or e.labels[i][j]]
    header = ["feature", *(["value"] if data is not None else []), "attribution",
              "std. error", "95% low", "95% high"]
    rows: list[list[Cell]] = [
        [e.feature_names[j], *([data[i, j].item()] if data is not None else []),
         float(e.values[i, k, j]), float(e.std_errors[i, k, j]), float(e.ci_low[i, k, j]),
         float(e.ci_high[i, k, j])] for j in order]
    return header, rows


def section_importance(r: Report, imp: Importance) -> None:
    r.figure(plots.importance(imp), f"{imp.method} importance ({imp.metric})")
    order = np.argsort(-imp.values, kind="stable")
    r.table(["feature", imp.metric or "importance", "std. error"],
            [[imp.feature_names[j], float(imp.values[j]), float(imp.std_errors[j])]
             for j in order])


def section_pdp(r: Report, pd: PartialDependence) -> None:
    r.figure(plots.partial_dependence(pd), f"partial dependence on {pd.feature}")
    se = pd.std_errors if pd.std_errors is not None else np.zeros_like(pd.average)
    r.table([pd.feature, "partial dependence", "std. error"],
            [[float(g), float(a), float(s)] for g, a, s in zip(pd.grid, pd.average, se,
                                                                 strict=True)])


def section_pdp2(r: Report, pd: PartialDependence2D) -> None:
    r.figure(plots.partial_dependence_2d(pd), f"{pd.features[0]} x {pd.features[1]}")
    r.paragraph(f"grid of {len(pd.grid_x)} x {len(pd.grid_y)} points; values from "
                f"{float(np.min(pd.values)):.4g} to {float(np.max(pd.values)):.4g}")


def section_figure_only(r: Report, result: Any) -> None:
    draws: dict[type, Callable[[Any], Figure]] = {
        Activations: plots.activations, Attention: plots.attention, Embedding: plots.embedding}
    draw = next(d for kind, d in draws.items() if isinstance(result, kind))
    r.figure(draw(result), f"{type(result).__name__.lower()} {getattr(result, 'layer', '')}"
             f"{getattr(result, 'name', '')}".strip())


SECTIONS: list[tuple[type, Callable[[Report, Any], None]]] = [
    (Importance, section_importance), (PartialDependence, section_pdp),
    (PartialDependence2D, section_pdp2), (Activations, section_figure_only),
    (Attention, section_figure_only), (Embedding, section_figure_only)]
