"""`Explanation`: one ExplainResponse as numpy arrays, with `to_frame()` and `to_shap()`.

Shapes: attributions, standard errors and 95% intervals are `(rows, outputs, features)` (the
players: features, patches, token positions); base values and predictions `(rows, outputs)`;
`maps[input]` is `(rows, outputs, *input shape)`, each element carrying its group's
attribution, for images and texts. Text rows have different tokens: their players are aligned
by token position (`tokens[3]`), with the words in `labels` and zeros at padding."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from service.client.inputs import Inputs
from service.client.wire import Array, array
from sidelight.v1 import explainer_pb2 as pb


@dataclass(frozen=True)
class Cost:
    """What the request cost, and the budget that applied (and where it came from)."""

    model_evaluations: int
    elapsed_ms: float
    budget_ms: float
    budget_source: str
    budget_exhausted: bool
    converged: bool


@dataclass(frozen=True)
class RowDetail:
    """How one row was explained (auto may pick a different method per row)."""

    method: str
    model_evaluations: int
    converged: bool
    budget_exhausted: bool
    samples: int
    diagnostics: dict[str, float]
    status: str = "OK"  # or NOT_REACHED: the budget ran out first (its numbers are NaN)
    status_detail: str = ""


@dataclass(frozen=True)
class Explanation:
    """Attributions with their error bars for every row and output of one request."""

    model: str
    version: str
    method: str
    values: Array  # (rows, outputs, features)
    std_errors: Array  # (rows, outputs, features); 0 for exact methods
    ci_low: Array  # (rows, outputs, features): 95% interval
    ci_high: Array
    base_values: Array  # (rows, outputs)
    predictions: Array  # (rows, outputs)
    feature_names: tuple[str, ...]
    output_names: tuple[str, ...]
    cost: Cost
    notes: tuple[str, ...] = ()
    inputs: dict[str, Array] = field(default_factory=dict)  # name -> (rows, *shape), as sent
    maps: dict[str, Array] = field(default_factory=dict)  # name -> (rows, outputs, *shape)
    labels: tuple[tuple[str, ...], ...] = ()  # per row and feature, when rows differ (text)
    rows: tuple[RowDetail, ...] = ()
    scale: str = "identity"
    modality: str = "tabular"
    grouping: str = ""
    baseline: str = ""
    background: str = ""
    background_rows: int = 0
    additive: bool = True
    cached: bool = False

    def __len__(self) -> int:
        return len(self.values)

    @property
    def data(self) -> Array | None:
        """The explained values per feature (rows, features): tabular inputs side by side, or
        the words of a text by position; None when players are groups of several elements."""
        if self.labels:
            return np.array(self.labels, dtype=str)
        flat = [a.reshape(len(a), -1) for a in self.inputs.values()]
        if self.modality != "tabular" or not flat:
            return None
        X = np.concatenate(flat, axis=1).astype(np.float64)  # (rows, columns)
        return X if X.shape[1] == len(self.feature_names) else None

    def output(self, which: int | str) -> int:
        """The index of an output given by position or name."""
        if isinstance(which, str):
            if which not in self.output_names:
                raise ValueError(f"output {which!r}: outputs are {list(self.output_names)}")
            return self.output_names.index(which)
        if not -len(self.output_names) <= which < len(self.output_names):
            raise ValueError(f"output {which}: {len(self.output_names)} outputs")
        return which % len(self.output_names)

    def top_output(self, row: int) -> int:
        """The explained output with the largest prediction for `row` (the predicted class)."""
        return int(np.argmax(self.predictions[row]))

    def columns(self, first_row: int = 0) -> dict[str, Array]:
        """One record per row and output: `row`, `output`, `<feature>` attributions,
        `<feature>_se`, `base_value`, `prediction` (the batch files' columns)."""
        n, k, d = self.values.shape
        out: dict[str, Array] = {
            "row": np.repeat(np.arange(first_row, first_row + n, dtype=np.int64), k),
            "output": np.tile(np.array(self.output_names, dtype=str), n)}
        values = self.values.reshape(n * k, d)  # (records, features)
        errors = self.std_errors.reshape(n * k, d)
        out.update({name: values[:, j] for j, name in enumerate(self.feature_names)})
        out.update({f"{name}_se": errors[:, j] for j, name in enumerate(self.feature_names)})
        out["base_value"] = self.base_values.reshape(-1)
        out["prediction"] = self.predictions.reshape(-1)
        if len(out) != 4 + 2 * d:
            raise ValueError(f"feature names collide with the record columns: "
                             f"{list(self.feature_names)}")
        return out

    def to_frame(self) -> Any:
        """A pandas DataFrame of `columns()` (needs pandas: `pip install 'sidelight[pandas]'`)."""
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("to_frame() needs pandas: pip install 'sidelight[pandas]'") from err
        return pd.DataFrame(self.columns())

    def to_shap(self) -> Any:
        """A `shap.Explanation` in shap's shapes: values (rows, features) for one output,
        (rows, features, outputs) for several; images and texts shaped like the input
        (rows, *input shape[, outputs]); base_values (rows[, outputs]); intervals as bounds."""
        try:
            import shap
        except ImportError as err:
            raise ImportError("to_shap() needs shap: pip install shap") from err
        squeeze = len(self.output_names) == 1
        common = {"base_values": self.base_values[:, 0] if squeeze else self.base_values,
                  "output_names": None if squeeze else list(self.output_names)}
        if self.modality == "image" and len(self.maps) == 1 and len(self.inputs) == 1:
            image = next(iter(self.maps.values()))  # (rows, outputs, *shape): per pixel
            return shap.Explanation(self._outputs_last(image),
                                    data=next(iter(self.inputs.values())), **common)
        return shap.Explanation(
            self._outputs_last(self.values), data=self.data,
            feature_names=list(self.feature_names),
            lower_bounds=self._outputs_last(self.ci_low),
            upper_bounds=self._outputs_last(self.ci_high),
            error_std=self._outputs_last(self.std_errors), **common)

    def _outputs_last(self, a: Array) -> Array:
        """(rows, outputs, ...) as (rows, ..., outputs), the outputs axis dropped when single."""
        moved = np.moveaxis(a, 1, -1)
        return moved[..., 0] if len(self.output_names) == 1 else moved


def from_response(r: pb.ExplainResponse, inputs: Inputs | None = None) -> Explanation:
    """The response's rows as arrays (text rows aligned by token position)."""
    names, place, labels = players(r)
    values, errors, low, high = (matrix(r, field, len(names), place if labels else None)
                                 for field in ("attributions", "std_errors", "ci_low",
                                               "ci_high"))
    return Explanation(
        model=r.model, version=r.version, method=r.method, values=values, std_errors=errors,
        ci_low=low, ci_high=high, base_values=per_output(r, "base_values"),
        predictions=per_output(r, "predictions"), feature_names=names,
        output_names=tuple(r.output_names), cost=cost_of(r.cost), notes=tuple(r.notes),
        inputs=dict(inputs.arrays) if inputs else {}, maps=maps_of(r), labels=labels,
        rows=tuple(detail(row) for row in r.rows), scale=r.scale, modality=r.modality,
        grouping=r.grouping, baseline=r.baseline, background=r.background,
        background_rows=r.background_rows, additive=r.additive, cached=r.cached)


def players(r: pb.ExplainResponse) -> tuple[tuple[str, ...], list[list[int]],
                                               tuple[tuple[str, ...], ...]]:
    """Feature names, each row's columns in them, and per-row labels when rows differ.

    Rows with their own labels (texts: "great @4") are placed by the position after the `@`;
    labels without one are placed in order."""
    if r.feature_names or not any(row.labels for row in r.rows):
        d = len(r.feature_names)
        return tuple(r.feature_names), [list(range(d))] * len(r.rows), ()
    parsed = [[position(label) for label in row.labels] for row in r.rows]
    if any(p is None for row in parsed for p in row):
        parsed = [list(range(len(row.labels))) for row in r.rows]
    width = max(map_width(r), 1 + max(p for row in parsed for p in row if p is not None))
    first = reached(r)
    name = first.maps[0].name if first is not None and first.maps else "player"
    words = [[""] * width for _ in r.rows]
    for row, places, out in zip(r.rows, parsed, words, strict=True):
        for label, p in zip(row.labels, places, strict=True):
            out[p] = label.rsplit(" @", 1)[0]  # type: ignore[index]
    return (tuple(f"{name}[{p}]" for p in range(width)),
            [[int(p) for p in row if p is not None] for row in parsed],
            tuple(tuple(w) for w in words))


def matrix(r: pb.ExplainResponse, field: str, d: int, place: list[list[int]] | None) -> Array:
    """One [outputs x players] field of every row as (rows, outputs, features); rows with
    their own players are scattered into their columns (zeros elsewhere)."""
    n, k = len(r.rows), len(r.output_names)
    if place is None:  # every row has the same players: one conversion
        return np.array([filled(getattr(row, field), k * d) for row in r.rows], np.float64)\
            .reshape(n, k, d)
    out = np.zeros((n, k, d))
    for i, row in enumerate(r.rows):
        if not getattr(row, field) and k * d:  # a row not reached
            out[i] = np.nan
            continue
        out[i][:, place[i]] = np.asarray(getattr(row, field), np.float64).reshape(k, -1)
    return out


def filled(values: Any, size: int) -> list[float]:
    """A row's numbers, or NaN in their place when the row was not reached (none sent)."""
    return list(values) if len(values) or not size else [np.nan] * size


def reached(r: pb.ExplainResponse) -> pb.RowExplanation | None:
    """The first row that was explained (rows not reached carry no numbers or maps)."""
    return next((row for row in r.rows if row.maps or row.attributions), None)


def position(label: str) -> int | None:
    """The token position of a label "word @k", None without one."""
    _, at, tail = label.rpartition(" @")
    return int(tail) if at and tail.isdigit() else None


def map_width(r: pb.ExplainResponse) -> int:
    """Elements per output of the first row's first map (a text's length), 0 without maps."""
    first = reached(r)
    if first is None or not first.maps:
        return 0
    return int(np.prod(first.maps[0].shape[1:]))


def per_output(r: pb.ExplainResponse, name: str) -> Array:
    k = len(r.output_names)
    return np.array([filled(getattr(row, name), k) for row in r.rows], np.float64)\
        .reshape(len(r.rows), k)


def maps_of(r: pb.ExplainResponse) -> dict[str, Array]:
    """name -> (rows, outputs, *input shape), stacked over rows."""
    first = reached(r)
    if first is None or not first.maps:
        return {}
    return {t.name: np.stack([array(row.maps[j]) if row.maps else np.full(
        tuple(t.shape), np.nan) for row in r.rows]) for j, t in enumerate(first.maps)}


def cost_of(c: pb.Cost) -> Cost:
    return Cost(c.model_evaluations, c.elapsed_ms, c.budget_ms, c.budget_source,
                c.budget_exhausted, c.converged)


def detail(row: pb.RowExplanation) -> RowDetail:
    return RowDetail(row.method, row.model_evaluations, row.converged, row.budget_exhausted,
                     row.samples, dict(row.diagnostics), row.status or "OK", row.status_detail)


def concatenate(parts: list[Explanation]) -> Explanation:
    """Explanations of consecutive chunks of one input as one (same model, outputs, features)."""
    first = parts[0]
    stack: dict[str, Any] = {n: np.concatenate([getattr(p, n) for p in parts]) for n in
             ("values", "std_errors", "ci_low", "ci_high", "base_values", "predictions")}
    inputs = {n: np.concatenate([p.inputs[n] for p in parts]) for n in first.inputs}
    maps = {n: np.concatenate([p.maps[n] for p in parts]) for n in first.maps}
    notes = tuple(dict.fromkeys(n for p in parts for n in p.notes))
    return replace(first, **stack, inputs=inputs, maps=maps, notes=notes,
                   labels=tuple(lab for p in parts for lab in p.labels),
                   rows=tuple(r for p in parts for r in p.rows),
                   cost=Cost(sum(p.cost.model_evaluations for p in parts),
                             sum(p.cost.elapsed_ms for p in parts), first.cost.budget_ms,
                             first.cost.budget_source,
                             any(p.cost.budget_exhausted for p in parts),
                             all(p.cost.converged for p in parts)))
