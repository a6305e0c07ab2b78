"""What is explained: an output's columns on a scale, as the function the estimators see."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, ModelFn
from explainers.errors import FailedPrecondition, InvalidArgument, clip, quoted
from service.models.inputs import Layout
from service.models.repository import LoadedModel
from service.plane.requests import check_finite

LOGIT_EPS = 1e-7
SCALES = ("identity", "logit", "margin")


@dataclass(frozen=True)
class Target:
    """The explained function: which output, which columns, on which scale."""

    output: str
    columns: tuple[int, ...]
    scale: str
    names: tuple[str, ...]

    @property
    def key(self) -> tuple[str, tuple[int, ...], str]:
        """What makes two targets the same explained function (names follow from it)."""
        return (self.output, self.columns, self.scale)


def resolve_target(model: LoadedModel, output: str, classes: tuple[int, ...],
                   scale: str) -> Target:
    """The request's target against the model's config and output shape ("" = configured)."""
    output = output or model.output
    model.onnx.output_info(output)
    names = model.column_names(output)
    default = model.config.classes if output == model.output and model.config.classes else None
    columns = tuple(classes) or tuple(default or range(len(names)))
    bad = [c for c in columns if not 0 <= c < len(names)]
    if bad:
        raise InvalidArgument(f"target.classes: {clip(str(bad))} out of range; output "
                              f"{output!r} has {len(names)} column(s)")
    scale = scale or model.config.scale
    if scale not in SCALES:
        raise InvalidArgument(f"target.scale: {quoted(scale)}; use one of {', '.join(SCALES)}")
    if scale == "margin" and output not in model.onnx.margin_outputs:
        raise InvalidArgument(f"target.scale: output {output!r} has no margin (no "
                              "post_transform to remove); use 'identity' or 'logit'")
    return Target(output, columns, scale, tuple(names[c] for c in columns))


def target_fn(model: LoadedModel, target: Target, layout: Layout | None = None) -> ModelFn:
    """The explained function: selected columns of an output, on the target's scale.

    The margin scale, and the logit of a LOGISTIC output, come from the margin session:
    exact where log(p / (1 - p)) of a float32 probability saturates.
    """
    columns = list(target.columns)
    from_margin = target.scale == "margin" or (
        target.scale == "logit" and target.output in model.onnx.logit_is_margin)
    scale = "identity" if from_margin else target.scale

    def f(X: Array) -> Array:
        y = model.onnx.predict(X, target.output, from_margin, layout)  # (rows, columns)
        return apply_scale(y[:, columns], scale)

    return f


def build_background(model: LoadedModel, data: Array, target: Target,
                     name: str = "") -> Background:
    """Background rows with f(background) for the target; logit needs probabilities.

    A background the model cannot take (a value its input type cannot hold, NaN where missing
    values are not allowed) or on which it returns inf/NaN is refused, naming it: every
    attribution and base value against it would be inf or NaN.
    """
    X = np.asarray(data, np.float64)  # (rows, features)
    field = f"background {name!r}" if name else "background"
    try:
        check_finite(X, model, field)
    except InvalidArgument as err:
        raise FailedPrecondition(f"{err}; upload a background the model can take") from err
    if target.scale == "logit" and target.output not in model.onnx.logit_is_margin:
        raw = model.onnx.predict(X, target.output)[:, list(target.columns)]  # (rows, outputs)
        if np.any((raw < 0) | (raw > 1)):
            raise InvalidArgument(f"target.scale: logit needs probabilities; output "
                                  f"{target.output!r} is not in [0, 1]")
    predictions = target_fn(model, target)(X)  # (rows, outputs)
    bad = ~np.isfinite(predictions)
    if bad.any():
        row = int(np.argwhere(bad)[0][0])
        raise FailedPrecondition(f"{field}: the model returns {predictions[row].tolist()} "
                                 f"on row {row}; upload a background on which it is finite")
    return Background.build(X, predictions)


def apply_scale(y: Array, scale: str) -> Array:
    """identity, or logit = log(p / (1 - p)) with p clipped away from 0 and 1."""
    if scale != "logit":
        return y
    p = np.clip(y, LOGIT_EPS, 1 - LOGIT_EPS)
    return np.asarray(np.log(p) - np.log1p(-p))
