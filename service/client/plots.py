"""Plots of explanations and of dataset-wide results (matplotlib: `pip install
'sidelight[plots]'`). Every function returns a matplotlib `Figure` (no pyplot state, Agg
backend); `save(fig, path)` writes a PNG. Error bars are 95% intervals where the method has
them (sampled attributions; exact methods draw none); PDPs draw a +-1.96 SE band.

Figures are deterministic for the same inputs (fixed size, DPI and font, no timestamps), so
tests compare them with committed reference images."""

from __future__ import annotations

import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize, TwoSlopeNorm
from matplotlib.figure import Figure, SubFigure

from service.client.explanation import Explanation
from service.client.images import heat, picture
from service.client.results import (
    Activations,
    Attention,
    Embedding,
    Importance,
    PartialDependence,
    PartialDependence2D,
    shapley_importance,
)
from service.client.wire import Array

DPI = 100
STYLE: dict[str, Any] = {"font.family": "DejaVu Sans", "font.size": 8.0, "axes.titlesize": 9.0,
         "axes.labelsize": 8.0, "xtick.labelsize": 7.0, "ytick.labelsize": 7.0,
         "legend.fontsize": 7.0, "figure.dpi": DPI, "savefig.dpi": DPI,
         "text.hinting": "default", "text.antialiased": True, "axes.unicode_minus": True,
         "image.interpolation": "nearest", "svg.hashsalt": "sidelight"}
POSITIVE, NEGATIVE, NEUTRAL = "#d6404e", "#3a78c3", "#8c8c8c"
DIVERGING = "RdBu_r"
MAX_FEATURES = 12


@contextmanager
def style() -> Iterator[None]:
    """The fixed style every figure is built and drawn in."""
    with mpl.rc_context(STYLE):  # type: ignore[arg-type]
        yield


def figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def png(fig: Figure) -> bytes:
    """The figure as PNG bytes (no metadata, so the same figure gives the same bytes)."""
    buffer = io.BytesIO()
    with style():
        fig.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.write_bytes(png(fig))
    return path


def errors(e: Explanation, row: int, output: int, order: Array) -> Array | None:
    """Asymmetric 95% interval bars (2, features) for the features in `order`, None when
    every interval is a point (exact methods)."""
    phi = e.values[row, output, order]
    low, high = e.ci_low[row, output, order], e.ci_high[row, output, order]
    if not np.any(high - low):
        return None
    return np.vstack([phi - low, high - phi])


def top(values: Array, k: int) -> Array:
    """Indices of the k largest |values|, largest first (ties in order)."""
    return np.argsort(-np.abs(values), kind="stable")[:k]


def label(e: Explanation, j: int, row: int | None = None) -> str:
    """A feature's name, with its value in the row for tabular data."""
    data = e.data if row is not None and e.modality == "tabular" else None
    return f"{e.feature_names[j]} = {data[row, j]:.4g}" if data is not None and row is not None \
        else e.feature_names[j]


def which(e: Explanation, row: int, output: int | str | None) -> int:
    return e.top_output(row) if output is None else e.output(output)


def subtitle(e: Explanation, row: int, k: int) -> str:
    return (f"{e.model} · {e.output_names[k]} · row {row} ({e.method})\nprediction "
            f"{e.predictions[row, k]:.4g}, base value {e.base_values[row, k]:.4g}")


def bar(e: Explanation, row: int = 0, output: int | str | None = None,
        max_features: int = MAX_FEATURES) -> Figure:
    """One row's attributions as horizontal bars, largest |value| on top, with 95% intervals."""
    k = which(e, row, output)
    order = top(e.values[row, k], max_features)
    phi = e.values[row, k, order]
    with style():
        fig = figure(6.0, 0.8 + 0.28 * len(order))
        ax = fig.add_subplot()
        y = np.arange(len(order))[::-1]
        ax.barh(y, phi, color=[POSITIVE if v > 0 else NEGATIVE for v in phi],
                xerr=errors(e, row, k, order), ecolor="black", capsize=2)
        ax.set_yticks(y, [label(e, j, row) for j in order])
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel(f"attribution ({e.scale})")
        ax.set_title(subtitle(e, row, k))
    return fig


def waterfall(e: Explanation, row: int = 0, output: int | str | None = None,
              max_features: int = MAX_FEATURES) -> Figure:
    """From the base value to the prediction, one step per feature (largest last, the rest
    summed in one step), each step with its 95% interval."""
    k = which(e, row, output)
    phi_all = e.values[row, k]
    order = top(phi_all, max_features - 1 if len(phi_all) > max_features else max_features)
    rest = np.setdiff1d(np.arange(len(phi_all)), order)
    steps = list(phi_all[order[::-1]])
    names = [label(e, j, row) for j in order[::-1]]
    bars = errors(e, row, k, order[::-1])
    if len(rest):
        steps.insert(0, float(phi_all[rest].sum()))
        names.insert(0, f"{len(rest)} other features")
        bars = None if bars is None else np.hstack([np.full((2, 1), np.nan), bars])
    with style():
        fig = figure(6.0, 1.0 + 0.28 * len(steps))
        ax = fig.add_subplot()
        starts = e.base_values[row, k] + np.concatenate([[0.0], np.cumsum(steps)[:-1]])
        y = np.arange(len(steps))
        ax.barh(y, steps, left=starts, color=[POSITIVE if s > 0 else NEGATIVE for s in steps])
        ax.use_sticky_edges = False  # room around the base and the prediction lines
        ax.margins(x=0.05)
        if bars is not None:
            ax.errorbar(starts + np.array(steps), y, xerr=bars, fmt="none", ecolor="black",
                        capsize=2, linewidth=0.8)
        ax.set_yticks(y, names)
        ax.axvline(e.base_values[row, k], color=NEUTRAL, linestyle="--", linewidth=0.8)
        ax.axvline(e.predictions[row, k], color="black", linewidth=0.8)
        ax.set_xlabel(f"base {e.base_values[row, k]:.4g} (dashed) → prediction "
                      f"{e.predictions[row, k]:.4g} ({e.scale})")
        ax.set_title(subtitle(e, row, k))
    return fig


def swarm(phi: Array, width: float = 0.4, bins: int = 60) -> Array:
    """Vertical offsets that stack points sharing an x bin (a deterministic beeswarm)."""
    span = float(np.ptp(phi)) or 1.0
    cells = np.floor((phi - phi.min()) / span * (bins - 1)).astype(int)
    offsets = np.zeros(len(phi))
    for cell in np.unique(cells):
        members = np.flatnonzero(cells == cell)
        rank = np.arange(len(members))
        side = np.where(rank % 2 == 0, 1, -1) * ((rank + 1) // 2)
        offsets[members] = side * min(width / max(len(members) // 2, 1), 0.08)
    return offsets


def beeswarm(e: Explanation, output: int | str = 0, max_features: int = MAX_FEATURES) -> Figure:
    """Dataset-wide attributions: a point per row and feature, coloured by the feature's value
    (low blue, high red), features by mean |attribution|."""
    k = e.output(output)
    phi = e.values[:, k, :]  # (rows, features)
    order = top(np.abs(phi).mean(axis=0), max_features)
    data = e.data if e.modality == "tabular" else None
    with style():
        fig = figure(6.0, 1.0 + 0.3 * len(order))
        ax = fig.add_subplot()
        for y, j in enumerate(order[::-1]):
            colour = NEUTRAL if data is None else ranks(data[:, j])
            ax.scatter(phi[:, j], y + swarm(phi[:, j]), s=6, c=colour, cmap="coolwarm",
                       vmin=0, vmax=1, linewidths=0)
        ax.set_yticks(range(len(order)), [e.feature_names[j] for j in order[::-1]])
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel(f"attribution to {e.output_names[k]} ({e.scale})")
        ax.set_title(f"{e.model}: {len(e)} rows ({e.method})")
        if data is not None:
            bar_ = fig.colorbar(mpl.cm.ScalarMappable(Normalize(0, 1), "coolwarm"), ax=ax,
                                ticks=[0, 1], aspect=30)
            bar_.ax.set_yticklabels(["low", "high"])
            bar_.set_label("feature value")
    return fig


def ranks(values: Array) -> Array:
    """Each value's rank in [0, 1] (ties share the lower rank): colours robust to outliers."""
    order = np.argsort(values, kind="stable")
    out = np.empty(len(values))
    out[order] = np.arange(len(values)) / max(len(values) - 1, 1)
    return out


def importance(imp: Importance, max_features: int = 20) -> Figure:
    """Scores per feature as bars, largest on top, with 95% intervals (1.96 SE)."""
    order = top(imp.values, max_features)
    with style():
        fig = figure(6.0, 0.8 + 0.28 * len(order))
        ax = fig.add_subplot()
        y = np.arange(len(order))[::-1]
        ax.barh(y, imp.values[order], xerr=1.96 * imp.std_errors[order], color=NEGATIVE,
                ecolor="black", capsize=2)
        ax.set_yticks(y, [imp.feature_names[j] for j in order])
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set_xlabel(imp.metric or "importance")
        ax.set_title(f"{imp.method} importance")
    return fig


def mean_attribution(e: Explanation, output: int | str = 0) -> Figure:
    """Mean |attribution| over the rows, per feature (a global Shapley bar chart)."""
    return importance(shapley_importance(e, e.output(output)))


def partial_dependence(pd: PartialDependence, max_curves: int = 50) -> Figure:
    """The PDP with its +-1.96 SE band over the ICE curves of the first rows."""
    with style():
        fig = figure(5.0, 3.2)
        ax = fig.add_subplot()
        if pd.ice is not None:
            for curve in pd.ice[:max_curves]:
                ax.plot(pd.grid, curve, color=NEUTRAL, linewidth=0.5, alpha=0.4)
        if pd.std_errors is not None:
            ax.fill_between(pd.grid, pd.average - 1.96 * pd.std_errors,
                            pd.average + 1.96 * pd.std_errors, color=POSITIVE, alpha=0.25,
                            linewidth=0, label="95% interval")
        ax.plot(pd.grid, pd.average, color=POSITIVE, linewidth=2, label="partial dependence")
        ax.set_xlabel(pd.feature)
        ax.set_ylabel(pd.output or "model output")
        ax.legend(loc="best")
        ax.set_title(f"partial dependence on {pd.feature}")
    return fig


def partial_dependence_2d(pd: PartialDependence2D) -> Figure:
    """A heat map of the mean output over two features, or with a class axis the decision
    regions (the class of the largest mean output), data points on top."""
    fx, fy = pd.features
    with style():
        fig = figure(5.0, 4.0)
        ax = fig.add_subplot()
        if pd.values.ndim == 3:
            regions(ax, pd)
        else:
            mesh = ax.pcolormesh(pd.grid_x, pd.grid_y, pd.values.T, cmap="viridis",
                                 shading="nearest")
            ax.contour(pd.grid_x, pd.grid_y, pd.values.T, colors="white", linewidths=0.6)
            fig.colorbar(mesh, ax=ax, label=pd.output or "model output")
        ax.set_xlabel(fx)
        ax.set_ylabel(fy)
        kind = "decision regions" if pd.values.ndim == 3 else "partial dependence"
        ax.set_title(f"{kind}: {fx} x {fy}")
    return fig


def regions(ax: Axes, pd: PartialDependence2D) -> None:
    classes = pd.values.shape[2]
    best = np.argmax(pd.values, axis=2)  # (nx, ny)
    cmap = mpl.colormaps["tab10"].resampled(10)
    ax.pcolormesh(pd.grid_x, pd.grid_y, best.T, cmap=cmap, vmin=-0.5, vmax=9.5, alpha=0.35,
                  shading="nearest")
    names = pd.class_names or tuple(str(c) for c in range(classes))
    if pd.points is not None:
        kinds = pd.point_classes if pd.point_classes is not None else np.zeros(len(pd.points))
        for c in range(classes):
            mine = kinds == c
            ax.scatter(pd.points[mine, 0], pd.points[mine, 1], s=10, color=cmap(c),
                       edgecolors="black", linewidths=0.3, label=names[c])
        ax.legend(loc="best")


def image(e: Explanation, row: int | Sequence[int] = 0, output: int | str | None = None,
          max_groups: int = 8) -> Figure:
    """Per row: the input, the attribution map overlaid on it (red raises the output, blue
    lowers it), and the largest groups with their 95% intervals."""
    rows = [row] if isinstance(row, int) else list(row)
    with style():
        fig = figure(9.0, 3.2 * len(rows))
        parts = fig.subfigures(len(rows), 1, squeeze=False).ravel()
        for part, i in zip(parts, rows, strict=True):
            image_row(part, e, i, which(e, i, output), max_groups)
    return fig


def image_row(fig: SubFigure, e: Explanation, row: int, k: int, max_groups: int) -> None:
    name = next(iter(e.maps))
    m = heat(e.maps[name][row, k])  # (H, W)
    x = picture(e.inputs[name][row]) if name in e.inputs else np.zeros(m.shape)
    limit = float(np.max(np.abs(m))) or 1.0
    first, second, third = fig.subplots(1, 3, width_ratios=[1, 1.25, 1.4])
    first.imshow(x, cmap="gray")
    first.set_title(f"input {name!r}")
    second.imshow(x, cmap="gray")
    shown = second.imshow(m, cmap=DIVERGING, vmin=-limit, vmax=limit, alpha=0.6)
    if x.ndim == 2 and np.ptp(x) > 0:  # the input's strokes drawn over the colours
        second.contour(x, levels=[0.5], colors="black", linewidths=0.8)
    fig.colorbar(shown, ax=second, shrink=0.8)
    second.set_title(f"{e.output_names[k]}: {e.predictions[row, k]:.3g} "
                     f"(base {e.base_values[row, k]:.3g})")
    for ax in (first, second):
        ax.set_axis_off()
    groups(third, e, row, k, max_groups)
    fig.suptitle(f"{e.model} · row {row} · {e.method}", fontsize=9)


def groups(ax: Axes, e: Explanation, row: int, k: int, count: int) -> None:
    order = top(e.values[row, k], count)
    phi = e.values[row, k, order]
    y = np.arange(len(order))[::-1]
    ax.barh(y, phi, color=[POSITIVE if v > 0 else NEGATIVE for v in phi],
            xerr=errors(e, row, k, order), ecolor="black", capsize=2)
    ax.set_yticks(y, [e.feature_names[j] for j in order])
    ax.axvline(0, color="black", linewidth=0.6)
    ax.set_title("largest groups")


def text(e: Explanation, row: int | Sequence[int] = 0, output: int | str | None = None,
         width: int = 64) -> Figure:
    """The words of each row in order, each on a background coloured by its attribution, the
    score (and its 95% interval half-width when sampled) under it; one colour scale."""
    rows = [row] if isinstance(row, int) else list(row)
    outputs = [which(e, i, output) for i in rows]
    layouts = [flow(words_of(e, i), width) for i in rows]
    heights = [1 + max((place[3] for place in lay), default=0) for lay in layouts]
    limit = max((float(np.max(np.abs(e.values[i, k]))) for i, k in zip(rows, outputs,
                                                                       strict=True)),
                default=0.0) or 1.0
    norm, cmap = TwoSlopeNorm(0.0, -limit, limit), mpl.colormaps[DIVERGING]
    with style():
        fig = figure(7.0, 1.0 + 0.55 * sum(heights) + 0.3 * len(rows))
        ax = fig.add_subplot()
        ax.set_xlim(0, width)
        ax.set_ylim(sum(heights) + 0.5 * len(rows), -0.1)
        ax.set_axis_off()
        top_ = 0.0
        for i, k, lay, height in zip(rows, outputs, layouts, heights, strict=True):
            ax.text(0, top_ + 0.15, f"row {i} · {e.output_names[k]}: prediction "
                    f"{e.predictions[i, k]:.4g}, base {e.base_values[i, k]:.4g}", fontsize=7,
                    color="#555555", va="center")
            words(ax, e, i, k, lay, top_ + 0.5, norm)
            top_ += height + 0.5
        fig.colorbar(mpl.cm.ScalarMappable(norm, cmap), ax=ax, orientation="horizontal",
                     fraction=0.08, aspect=50, label=f"attribution ({e.scale})")
        ax.set_title(f"{e.model} ({e.method})")
    return fig


def words_of(e: Explanation, row: int) -> list[tuple[int, str]]:
    """(feature index, word) of a row's tokens in order, padding left out."""
    names = e.labels[row] if e.labels else e.feature_names
    return [(j, w) for j, w in enumerate(names) if w]


def words(ax: Axes, e: Explanation, row: int, k: int,
          layout: list[tuple[int, str, float, int]], y0: float, norm: TwoSlopeNorm) -> None:
    """One row's words on their colours, white on the darkest, the score under each."""
    phi, half = e.values[row, k], (e.ci_high[row, k] - e.ci_low[row, k]) / 2
    cmap = mpl.colormaps[DIVERGING]
    for j, word, x, line in layout:
        level = float(norm(phi[j]))
        ax.text(x, y0 + line + 0.15, word, family="DejaVu Sans Mono", fontsize=9, va="center",
                color="white" if abs(level - 0.5) > 0.3 else "black",
                bbox={"boxstyle": "round,pad=0.2", "linewidth": 0, "facecolor": cmap(level)})
        score = f"{phi[j]:+.3f}" + (f"±{half[j]:.2g}" if half[j] > 0 else "")
        ax.text(x, y0 + line + 0.55, score, family="DejaVu Sans Mono", fontsize=6,
                va="center", color="#333333")


def flow(items: list[tuple[int, str]], width: int) -> list[tuple[int, str, float, int]]:
    """(index, word, x, line) of words laid out left to right in character cells, wrapping
    at `width`."""
    places, x, line = [], 0.0, 0
    for j, w in items:
        size = max(len(w), 7) + 2  # room for the score under the word
        if x + size > width and x > 0:
            x, line = 0.0, line + 1
        places.append((j, w, x, line))
        x += size
    return places


def activations(a: Activations, max_channels: int = 16) -> Figure:
    """A layer's channels as a grid of maps, each on its own colour scale."""
    count = min(len(a.values), max_channels)
    cols = int(np.ceil(np.sqrt(count)))
    rows = int(np.ceil(count / cols))
    with style():
        fig = figure(1.4 * cols + 0.4, 1.4 * rows + 0.5)
        axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
        for c, ax in enumerate(axes):
            ax.set_axis_off()
            if c < count:
                ax.imshow(a.values[c], cmap="viridis")
                ax.set_title(f"channel {c}", fontsize=7)
        fig.suptitle(f"activations of {a.layer} ({count} of {len(a.values)} channels)",
                     fontsize=9)
    return fig


def attention(a: Attention, max_heads: int = 4) -> Figure:
    """Attention probabilities per head: queries down, keys across."""
    heads = min(len(a.weights), max_heads)
    with style():
        fig = figure(3.4 * heads + 0.6, 3.6)
        axes = np.atleast_1d(fig.subplots(1, heads, squeeze=False)).ravel()
        shown: Any = None
        for h, ax in enumerate(axes):
            shown = ax.imshow(a.weights[h], cmap="Blues", vmin=0, vmax=1)
            ticks = range(len(a.tokens))
            ax.set_xticks(ticks, a.tokens, rotation=90)
            ax.set_yticks(ticks, a.tokens)
            ax.set_title(f"head {h}")
        fig.colorbar(shown, ax=list(axes), shrink=0.8, label="attention")
        fig.suptitle(f"attention of {a.layer}", fontsize=9)
    return fig


def project(points: Array) -> Array:
    """(n, dims) to (n, 2): the first two principal components (signs fixed), or as is."""
    if points.shape[1] <= 2:
        return points if points.shape[1] == 2 else np.column_stack([points,
                                                                    np.zeros(len(points))])
    centred = points - points.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    signs = np.sign(vt[:2, np.argmax(np.abs(vt[:2]), axis=1)].diagonal())
    return centred @ (vt[:2].T * np.where(signs == 0, 1, signs))  # type: ignore[no-any-return]


def embedding(emb: Embedding, max_labels: int = 20) -> Figure:
    """Points of an embedding (first two principal components when wider), coloured by class
    or value, the first points labelled."""
    xy = project(emb.points)  # (n, 2)
    with style():
        fig = figure(5.0, 4.0)
        ax = fig.add_subplot()
        if emb.classes:
            kinds = np.array(emb.classes)
            for c, name in enumerate(dict.fromkeys(emb.classes)):
                mine = kinds == name
                ax.scatter(xy[mine, 0], xy[mine, 1], s=12, color=mpl.colormaps["tab10"](c % 10),
                           label=name, linewidths=0)
            ax.legend(loc="best")
        else:
            shown = ax.scatter(xy[:, 0], xy[:, 1], s=12, c=emb.values, cmap="viridis",
                               linewidths=0)
            if emb.values is not None:
                fig.colorbar(shown, ax=ax)
        for (x, y), text_ in zip(xy[:max_labels], emb.labels[:max_labels], strict=False):
            ax.annotate(text_, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
        wide = emb.points.shape[1] > 2
        ax.set_xlabel("component 1" if wide else "dimension 1")
        ax.set_ylabel("component 2" if wide else "dimension 2")
        ax.set_title(f"embedding {emb.name} ({len(xy)} points)")
    return fig


def summary(e: Explanation, max_rows: int = 4) -> Figure:
    """The picture that suits the answer: a waterfall of one table row, a beeswarm of several,
    the maps of the first images or the words of the first texts."""
    first = list(range(min(len(e), max_rows)))
    if e.modality == "image" and e.maps:
        return image(e, first)
    if e.modality == "text":
        return text(e, list(range(min(len(e), 2 * max_rows))))
    return waterfall(e) if len(e) == 1 else beeswarm(e)
