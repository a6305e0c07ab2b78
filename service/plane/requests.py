"""Requests in domain terms and their validation: tensors against the model's inputs, uploads
against the limits, names that become Redis keys. Every error names the offending field."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument, quoted
from service.config import Settings
from service.models.inputs import Layout
from service.models.onnx_model import OIP_TO_NUMPY
from service.models.repository import LoadedModel
from service.plane.baselines import BaselineSpec
from service.plane.grouping import GroupRequest
from service.plane.players import OcclusionRequest

NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class GradientRequest:
    """A request's options for the gradient methods (0 / "" = the method's default)."""

    layer: str = ""
    signed: bool = False
    noise_level: float = 0.0
    samples: int = 0
    steps: int = 0
    relu: bool = False


@dataclass(frozen=True)
class ExplainQuery:
    """An Explain request in domain terms. `deadline_s` is the time left on the caller's clock."""

    model: str
    inputs: tuple[tuple[str, Array], ...]
    version: str = ""
    method: str = ""
    output: str = ""
    classes: tuple[int, ...] = ()
    scale: str = ""
    budget_ms: float = 0.0
    deadline_s: float | None = None
    seed: int = 0
    background: str = ""
    target_error: float = 0.0
    max_evaluations: int = 0
    groups: GroupRequest = dataclasses.field(default_factory=GroupRequest)
    baseline: BaselineSpec | None = None  # None = the model's default
    occlusion: OcclusionRequest = dataclasses.field(default_factory=OcclusionRequest)
    gradients: GradientRequest = dataclasses.field(default_factory=GradientRequest)


@dataclass(frozen=True)
class BackgroundUpload:
    """A PutBackground request in domain terms."""

    model: str
    data: Array  # (rows, features)
    version: str = ""
    name: str = ""
    feature_names: tuple[str, ...] = ()
    client: str = ""  # who uploads (token name, else peer address): per-client upload limits


def assemble(model: LoadedModel, inputs: tuple[tuple[str, Array], ...],
             max_rows: int) -> tuple[Array, Layout]:
    """The request's tensors as one (rows, elements) float64 matrix and how its elements form
    the model's inputs (symbolic axes sized by the request), or INVALID_ARGUMENT."""
    specs = model.onnx.inputs
    if len(inputs) != len(specs):
        names = ", ".join(s.name for s in specs)
        raise InvalidArgument(f"inputs: model {model.name!r} takes {len(specs)} input(s) "
                              f"({names}); got {len(inputs)}")
    ordered = _order_inputs(inputs, [s.name for s in specs])
    for k, (i, arr) in enumerate(ordered):
        _check_input(i, arr, specs[k].shape, specs[k].datatype)
    rows = {arr.shape[0] for _, arr in ordered}
    if len(rows) != 1:
        raise InvalidArgument(f"inputs: every input needs the same batch size; got {rows}")
    if rows == {0}:
        raise InvalidArgument("inputs[0].shape: empty batch: send at least one row")
    if ordered[0][1].shape[0] > max_rows:
        raise InvalidArgument(f"inputs[0].shape: {ordered[0][1].shape[0]} rows; at most "
                              f"{max_rows} per request (max_rows_per_request)")
    layout = model.onnx.layout if model.onnx.static else Layout.resolve(
        specs, [arr.shape[1:] for _, arr in ordered])
    X = layout.flatten([arr for _, arr in ordered])  # (rows, elements)
    check_finite(X, model, layout=layout)
    return X, layout


def check_upload(model: LoadedModel, data: Array, settings: Settings) -> Array:
    """A background upload against the model's features and the configured limits."""
    s, d = settings, model.onnx.n_features
    if data.dtype not in (np.float32, np.float64):
        raise InvalidArgument(f"data.datatype: {data.dtype}; backgrounds are FP32 or FP64")
    if data.ndim != 2 or data.shape[1] != d or data.shape[0] == 0:
        raise InvalidArgument(f"data.shape: {list(data.shape)}; model needs [rows >= 1, {d}]")
    if data.shape[0] > s.max_background_rows or data.size > s.max_background_cells:
        raise InvalidArgument(f"data.shape: {list(data.shape)} exceeds the limits "
                              f"max_background_rows={s.max_background_rows}, "
                              f"max_background_cells={s.max_background_cells}")
    check_finite(data, model, "data")
    return data


def check_finite(X: Array, model: LoadedModel, field: str = "inputs",
                 layout: Layout | None = None) -> None:
    """Reject infinities always, NaN unless the model declares it accepts missing values, and
    values the model's input type cannot hold: checked in float64 alone, 1e39 would pass and
    become inf inside an FP32 model (and NaN cannot reach an integer input)."""
    bad = np.isinf(X) if model.config.allow_missing else ~np.isfinite(X)
    if bad.any():
        row, col = map(int, np.argwhere(bad)[0])
        raise InvalidArgument(f"{field}: non-finite value at row {row}, feature {col} (NaN is "
                              "accepted only by models whose explain.yaml sets allow_missing)")
    offsets = (layout or model.onnx.layout).offsets
    for k, info in enumerate(model.onnx.inputs):
        cols = X[:, offsets[k]:offsets[k + 1]]  # (rows, columns of this input)
        out = unrepresentable(cols, OIP_TO_NUMPY[info.datatype])
        if out.any():
            row, col = map(int, np.argwhere(out)[0])
            raise InvalidArgument(
                f"{field}: value {cols[row, col]:.6g} at row {row}, feature "
                f"{offsets[k] + col} does not fit the model's {info.datatype} input "
                f"{info.name!r}{_range(OIP_TO_NUMPY[info.datatype])}")


def unrepresentable(values: Array, dtype: type) -> Array:
    """Where float64 `values` would not survive the cast to `dtype`: finite values that
    overflow a float type, NaN or out-of-range values for an integer type. Same shape."""
    kind = np.dtype(dtype).kind
    if kind == "f":
        with np.errstate(over="ignore"):
            return np.asarray(np.isfinite(values) & ~np.isfinite(values.astype(dtype)))
    if kind in "iu":
        limits = np.iinfo(dtype)  # max + 1.0 is exact in float64, max itself may not be
        return np.asarray(np.isnan(values) | (values < limits.min)
                          | (values >= float(limits.max) + 1.0))
    return np.zeros(values.shape, bool)


def _range(dtype: type) -> str:
    """ " (largest finite 3.40282e+38)" for float types, the range for integer types."""
    if np.dtype(dtype).kind == "f":
        return f" (largest finite {float(np.finfo(dtype).max):.6g})"
    if np.dtype(dtype).kind in "iu":
        return f" (range {np.iinfo(dtype).min} to {np.iinfo(dtype).max})"
    return ""


def check_name(name: str) -> str:
    """Background names: 1-64 of letters, digits, '.', '_' and '-' (they become Redis keys)."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidArgument(f"name: {quoted(name)} must be 1-64 characters of [A-Za-z0-9._-]")
    return name


def _order_inputs(inputs: tuple[tuple[str, Array], ...],
                  names: list[str]) -> list[tuple[int, Array]]:
    """Match tensors to model inputs by name, or by position when no tensor is named."""
    if not any(n for n, _ in inputs):
        return list(enumerate(a for _, a in inputs))
    index: dict[str, int] = {}
    for i, (n, _) in enumerate(inputs):
        if n in index:
            raise InvalidArgument(f"inputs[{i}].name: input {quoted(n)} sent twice")
        index[n] = i
        if n not in names:
            raise InvalidArgument(f"inputs[{i}].name: model has no input {quoted(n)}; inputs: "
                                  f"{', '.join(names)}")
    return [(index[n], inputs[index[n]][1]) for n in names]


def _check_input(i: int, arr: Array, shape: tuple[int, ...], datatype: str) -> None:
    """One tensor against its model input: rank, static axes, a numeric dtype, whole numbers
    for integer inputs."""
    field = f"inputs[{i}]"
    if arr.ndim != len(shape) or any(d >= 0 and d != a for d, a in
                                     zip(shape[1:], arr.shape[1:], strict=True)):
        want = ["N", *(d if d >= 0 else "?" for d in shape[1:])]
        raise InvalidArgument(f"{field}.shape: got {list(arr.shape)}, model input takes {want}")
    if arr.dtype.kind not in "biuf":
        raise InvalidArgument(f"{field}.datatype: {arr.dtype} is not numeric; model takes "
                              f"{datatype}")
    if arr.ndim > 1 and 0 in arr.shape[1:]:
        raise InvalidArgument(f"{field}.shape: {list(arr.shape)}: every axis needs an element")
    if np.dtype(OIP_TO_NUMPY[datatype]).kind in "biu" and arr.dtype.kind == "f":
        X = arr[np.isfinite(arr)]
        if np.any(np.mod(X, 1)):
            raise InvalidArgument(f"{field}: model input is {datatype}; values must be whole "
                                  "numbers")
