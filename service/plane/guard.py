"""The last check on every answer before it leaves the data plane: every number finite, and
the attributions of additive methods adding up to f(x) - E f.

Each method is efficient by construction (exact, permutation and kernel force
sum(phi) = f(x) - E f; tree and linear are exact on their scale), so a gap means the method's
premise failed on this input: a model that is not affine where linear assumed it, trees that
disagree with onnxruntime, or inf/NaN leaking from the model. The check costs a few array
operations on numbers already computed. Its tolerance is relative to the size of the numbers,
max(|f(x)|, |E f|, std of f(background)), per method and the model's precision:

| method                      | FP64  | FP32  | FP16  | BF16  |
|-----------------------------|-------|-------|-------|-------|
| exact, permutation, kernel  | 1e-9  | 1e-9  | 1e-9  | 1e-9  |
| linear, tree                | 1e-9  | 1e-5  | 1e-2  | 1e-1  |

The samplers sum the model's own outputs in float64, so only float64 rounding separates the two
sides (measured on the bundled models, rows from the background and 5x past it: at most 8e-16).
Linear and tree compare their closed forms with onnxruntime's outputs, which carry the model's
rounding (measured on the same rows of the FP32 bundled models: linear 6.2e-7, tree 1.7e-8;
the table allows ~100 float32 ulps).

What happens on a failure (in `checked`): linear or tree with a gap or non-finite attributions
fall back to the sampler with a note; a non-finite prediction is the caller's input
(INVALID_ARGUMENT); a non-finite base value is the background (FAILED_PRECONDITION: upload a
finite one); anything else (non-finite attributions or diagnostics, a gap) is
FAILED_PRECONDITION. A failed answer is never returned as OK, so
it is never cached and never reaches the metrics as an answered row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from explainers.base import Array, Background, Estimator, Explanation
from explainers.errors import FailedPrecondition, InvalidArgument, SidelightError
from service.plane.methods import Choice
from service.plane.targets import Target

SAMPLERS = ("exact", "permutation", "kernel", "partition")
CLOSED_FORMS = ("linear", "tree")  # fall back to the sampler when their answer fails
OWN_BASE = ("tree",)  # methods that compute their own base value (not the data plane's E f)
SAMPLER_TOLERANCE = 1e-9
CLOSED_FORM_TOLERANCE = {"FP64": 1e-9, "FP32": 1e-5, "FP16": 1e-2, "BF16": 1e-1}
TINY = float(np.finfo(np.float64).tiny)  # sizes are at least this: 0 / 0 never happens

Rows = tuple[Explanation, ...]


@dataclass(frozen=True)
class Failure:
    """The first thing wrong with an answer: which row, what kind, and the numbers."""

    row: int
    method: str
    kind: str  # prediction, base, values, gap or diagnostics
    detail: str

    def note(self) -> str:
        """What the response says when the method is replaced."""
        return (f"method {self.method} failed its check on row {self.row} ({self.detail}); "
                "fell back to auto")

    def error(self, precision: str, background: str) -> SidelightError:
        """The status for an answer that cannot be returned."""
        if self.kind == "prediction":
            return InvalidArgument(
                f"inputs: row {self.row}: the model returns {self.detail} on it: a value "
                f"overflows the model's {precision} arithmetic or the model produces inf/NaN "
                "there")
        if self.kind == "base":
            return FailedPrecondition(f"background: {background!r}: E f(background) is "
                                      f"{self.detail}; upload a finite background")
        if self.kind == "values":
            return FailedPrecondition(
                f"inputs: row {self.row}: the {self.method} attributions are not finite: the "
                f"model returns inf/NaN on mixes of this row with background {background!r}")
        if self.kind == "diagnostics":
            return FailedPrecondition(f"inputs: row {self.row}: the {self.method} diagnostics "
                                      f"are not finite ({self.detail}); no answer returned")
        return FailedPrecondition(f"inputs: row {self.row}: the {self.method} attributions "
                                  f"do not add up ({self.detail}); no answer returned")


def tolerance(method: str, precision: str, additive: bool = True) -> float | None:
    """The relative additivity tolerance of a method on a model of this precision (None: the
    method is not additive, such as occlusion and lime: only finiteness is checked)."""
    if not additive:
        return None
    if method in SAMPLERS:
        return SAMPLER_TOLERANCE
    if method in CLOSED_FORMS:
        return CLOSED_FORM_TOLERANCE.get(precision, CLOSED_FORM_TOLERANCE["FP16"])
    return None


def find_failure(rows: Rows, precision: str, background: Background | None) -> Failure | None:
    """The most telling failure over all rows (the input, then the background, then the
    attributions), or None. `background` is the one of the answer's target, when known: its
    E f must then equal the rows' base values (TreeSHAP computes its own).

    A clean answer passes one vectorised test (an inf or NaN anywhere makes its row's gap
    non-finite); only a failing one is diagnosed. CPU per call on a busy 2-core machine: ~25 us
    for one row, ~0.26 ms for 256 rows of 30 features."""
    if not rows:
        return None
    if len({r.values.shape for r in rows}) > 1:  # players differ per row (tokens): one by one
        for i, r in enumerate(rows):
            found = find_failure((r,), precision, background)
            if found is not None:
                return Failure(i, found.method, found.kind, found.detail)
        return None
    pred, base, values, errors = (_stacked([getattr(r, name) for r in rows]) for name in (
        "prediction", "base_values", "values", "std_errors"))  # (rows, outputs[, features])
    tol = _tolerances(rows, precision)  # (rows,)
    own_base = any(r.method in OWN_BASE for r in rows)  # the others are handed E f itself
    gaps = relative_gaps(pred, base, values, background if own_base else None, spread=False)
    if float(np.max(gaps - tol)) <= 0 and math.isfinite(float(errors.sum())):
        return _diagnostics(rows)  # NaN fails both tests; the std of f(background) not needed
    return _non_finite(rows, pred, base, values, errors) \
        or _gap(rows, relative_gaps(pred, base, values, background), tol) or _diagnostics(rows)


def _diagnostics(rows: Rows) -> Failure | None:
    """The first row whose diagnostics (a method's own figures) hold inf/NaN."""
    for i, r in enumerate(rows):
        bad = [name for name, value in r.diagnostics if not math.isfinite(value)]
        if bad:
            return Failure(i, r.method, "diagnostics", f"{', '.join(bad)} not finite")
    return None


def _non_finite(rows: Rows, pred: Array, base: Array, values: Array,
                errors: Array) -> Failure | None:
    """The first row with an inf/NaN prediction, else base value, else attribution."""
    finite = np.isfinite(values).all(axis=(1, 2)) & np.isfinite(errors).all(axis=(1, 2))
    for kind, ok in (("prediction", np.isfinite(pred).all(axis=1)),
                     ("base", np.isfinite(base).all(axis=1)), ("values", finite)):
        if not ok.all():
            i = int(np.argmin(ok))
            shown = {"prediction": _shown(pred[i]), "base": _shown(base[i])}
            return Failure(i, rows[i].method, kind, shown.get(kind, "non-finite attributions"))
    return None


def checked(choice: Choice, rows: Rows, target: Target, background: Background | None,
            precision: str, background_name: str, rerun: Callable[[Choice], Rows],
            sampler: Estimator) -> tuple[Choice, Rows]:
    """The answer if it passes; else, for linear and tree, the sampler's answer on the
    request's `target` (whose f(background) is `background`) with a note; else the error
    saying why there is none. Tree may have moved to the margin: its base is then its own."""
    failure = find_failure(rows, precision, background if choice.target == target else None)
    if failure is None:
        return choice, rows
    if failure.method in CLOSED_FORMS and failure.kind in ("values", "gap"):
        choice = Choice(sampler, target, (failure.note(),))
        rows = rerun(choice)
        failure = find_failure(rows, precision, background)
        if failure is None:
            return choice, rows
    raise failure.error(precision, background_name)


def relative_gaps(pred: Array, base: Array, values: Array, background: Background | None,
                  spread: bool = True) -> Array:
    """Per row, the largest over outputs of |f(x) - base - sum(phi)| and |base - E f| over
    the size of the numbers, max(|f(x)|, |base|, |E f|, std of f(background) unless not
    `spread`): (rows,). pred and base are (rows, outputs), values (rows, outputs, features)."""
    gap = np.abs(pred - base - values.sum(axis=2))  # (rows, outputs)
    size = np.maximum(np.abs(pred), np.abs(base))
    if background is not None:
        expected = background.base_values  # (outputs,)
        gap = np.maximum(gap, np.abs(base - expected))
        size = np.maximum(size, np.abs(expected))
        if spread:
            size = np.maximum(size, np.sqrt(background.weights
                                            @ (background.predictions - expected) ** 2))
    return np.asarray((gap / np.maximum(size, TINY)).max(axis=1))


def _tolerances(rows: Rows, precision: str) -> Array:
    """Each row's relative tolerance (inf where the method is not additive): (rows,)."""
    return np.array([tolerance(r.method, precision, r.additive) or np.inf for r in rows])


def _gap(rows: Rows, gaps: Array, tol: Array) -> Failure | None:
    """The first row whose relative gap exceeds its method's tolerance."""
    over = np.flatnonzero(~(gaps <= tol))
    if over.size == 0:
        return None
    i = int(over[0])
    return Failure(i, rows[i].method, "gap", f"sum(attributions) misses f(x) - E f by "
                                             f"{gaps[i]:.3g} of the outputs' size; tolerance "
                                             f"{tol[i]:g}")


def _stacked(arrays: list[Array]) -> Array:
    """Equal-shaped arrays as one (len, *shape) array (concatenate: ~2x np.array here)."""
    if len(arrays) == 1:
        return arrays[0][None]
    return np.concatenate(arrays).reshape((len(arrays), *arrays[0].shape))


def _shown(values: Array) -> str:
    """A short rendering of a small vector for a message."""
    return str([float(v) for v in values[:4]]) + (" ..." if values.size > 4 else "")
