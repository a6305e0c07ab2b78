"""Activation maps: the values of named intermediate tensors for the given rows, computed by an
exposed copy of the graph (`graph.Exposed`), with per-row summary statistics, optionally
reduced so that large tensors fit an answer.

Reductions act on axis 1 of a (rows, channels, ...) tensor, the channel axis of ONNX's NCHW
convolutions (for a (rows, tokens, width) transformer tensor it is the token axis):
`channel_mean` averages the channels into one map (rows, ...); `top_k` keeps, per row, the k
channels of highest mean activation (rows, k, ...) and says which. A tensor whose leading axis
is not the rows' (a shape computation, heads folded into the batch) is returned whole, its
statistics over the whole tensor, and cannot be reduced. Two byte limits bound a call: the raw
tensors computed (checked before running, from the static shapes) and the values returned;
past either the call is refused with RESOURCE_EXHAUSTED naming the limit. A caller streams
by sending rows in groups.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument, ResourceExhausted, quoted
from explainers.layers.graph import Exposed, TensorInfo, rows_of

REDUCTIONS = ("none", "channel_mean", "top_k")
OFFERED = "channel_mean, top_k"  # the reductions a refusal suggests
MAX_BYTES = 32 << 20  # values one call returns
MAX_RUN_BYTES = 256 << 20  # raw tensors one call computes


@dataclass(frozen=True)
class Summary:
    """Statistics of each row's values (over the whole tensor when it has no row axis)."""

    mean: Array  # (rows,)
    std: Array  # (rows,) population standard deviation
    min: Array  # (rows,)
    max: Array  # (rows,)
    zeros: Array  # (rows,) fraction of values exactly 0
    channel_mean: Array | None  # (rows, channels) mean over the trailing axes; rank >= 3 only


@dataclass(frozen=True)
class Activation:
    """One tensor's values for the rows, as asked for."""

    name: str
    shape: tuple[int, ...]  # the full tensor's shape for these rows
    dtype: str  # the tensor's numpy dtype
    per_row: bool  # axis 0 is the rows' (else values and statistics are of the whole tensor)
    summary: Summary
    reduction: str  # one of REDUCTIONS
    values: Array  # none: as computed; channel_mean: (rows, *rest); top_k: (rows, k, *rest)
    channels: Array | None  # top_k: (rows, k) channel indices, highest mean activation first


def activations(exposed: Exposed, feeds: dict[str, Array], reduction: str = "none",
                k: int = 8, max_bytes: int = MAX_BYTES, max_run_bytes: int = MAX_RUN_BYTES
                ) -> list[Activation]:
    """The exposed tensors for the fed rows, in the order they were named."""
    _check_request(reduction, k)
    rows = rows_of(feeds)
    check_sizes(exposed, rows, reduction != "none", max_bytes, max_run_bytes, OFFERED)
    got = exposed.run(feeds)
    out = [_activation(exposed.infos[name], got[name], rows, reduction, k)
           for name in exposed.names]
    check_answer([a.values for a in out], rows, max_bytes, OFFERED)
    return out


def _check_request(reduction: str, k: int) -> None:
    """InvalidArgument for an unknown reduction or a top-k keeping nothing."""
    if reduction not in REDUCTIONS:
        raise InvalidArgument(f"reduction: {quoted(reduction)}; one of {', '.join(REDUCTIONS)}")
    if reduction == "top_k" and k < 1:
        raise InvalidArgument(f"k: top_k keeps at least one channel, got {k}")


def check_sizes(exposed: Exposed, rows: int, reduced: bool, max_bytes: int,
                max_run_bytes: int, reductions: str) -> None:
    """Refuse before running when the static shapes say the tensors computed (or, unreduced,
    returned) are too large."""
    per_row = exposed.row_bytes()
    if per_row is None:
        return
    raw = per_row * rows
    if raw > max_run_bytes:
        raise ResourceExhausted(f"layers: the tensors take {raw} bytes for {rows} rows, over "
                                f"the {max_run_bytes}-byte limit on computed tensors; send "
                                "fewer rows or fewer tensors")
    if not reduced and raw > max_bytes:
        raise too_large(raw, rows, max_bytes, reductions)


def check_answer(values: Sequence[Array], rows: int, max_bytes: int, reductions: str) -> None:
    """Refuse values larger than the answer's limit."""
    total = sum(v.nbytes for v in values)
    if total > max_bytes:
        raise too_large(total, rows, max_bytes, reductions)


def too_large(size: int, rows: int, max_bytes: int, reductions: str) -> ResourceExhausted:
    """The refusal of an answer over the byte limit, naming it and what would fit."""
    return ResourceExhausted(f"layers: the values take {size} bytes for {rows} rows, over the "
                             f"{max_bytes}-byte limit on an answer; ask for a reduction "
                             f"({reductions}), fewer tensors or fewer rows")


def _activation(info: TensorInfo, value: Array, rows: int, reduction: str,
                k: int) -> Activation:
    """One tensor's summary and (reduced) values."""
    per_row = _per_row(info, value, rows)
    by_row = value if per_row else value[None]  # (rows or 1, ...)
    values, channels = _reduced(info.name, value, per_row, reduction, k)
    return Activation(info.name, tuple(value.shape), value.dtype.name, per_row,
                      summary(by_row), reduction, values, channels)


def _per_row(info: TensorInfo, value: Array, rows: int) -> bool:
    """Axis 0 holds the rows: inference says so (or could not tell) and the size agrees."""
    trusted = info.batch_axis == 0 or info.shape is None
    return trusted and value.ndim >= 1 and value.shape[0] == rows


def summary(by_row: Array) -> Summary:
    """Statistics of (rows, ...) values per row, in float64; 0 for rows without values (an
    answer's numbers are always finite)."""
    rows = by_row.shape[0]
    x = by_row.reshape(rows, -1).astype(np.float64)  # (rows, elements)
    if x.shape[1] == 0:
        zero = np.zeros(rows)
        return Summary(zero, zero, zero, zero, zero, None)
    channels = None
    if by_row.ndim >= 3:
        channels = by_row.reshape(rows, by_row.shape[1], -1).astype(np.float64).mean(axis=2)
    return Summary(x.mean(axis=1), x.std(axis=1), x.min(axis=1), x.max(axis=1),
                   (x == 0).mean(axis=1), channels)


def _reduced(name: str, value: Array, per_row: bool, reduction: str,
             k: int) -> tuple[Array, Array | None]:
    """The values as asked: whole, channel mean (rows, *rest) or top-k (rows, k, *rest)."""
    if reduction == "none":
        return value, None
    if not per_row or value.ndim < 2:
        raise InvalidArgument(f"reduction: {quoted(name)} has shape {list(value.shape)}; "
                              f"{reduction} needs (rows, channels, ...) values")
    kind = np.promote_types(value.dtype, np.float32)
    if reduction == "channel_mean":
        return value.astype(np.float64).mean(axis=1).astype(kind), None
    return top_k(value, k)


def top_k(value: Array, k: int) -> tuple[Array, Array]:
    """Per row, the k channels (axis 1) of highest mean activation, highest first (ties: the
    lower index): values (rows, k, *rest) and indices (rows, k)."""
    rows, channels = value.shape[:2]
    means = value.reshape(rows, channels, -1).astype(np.float64).mean(axis=2)  # (rows, C)
    index = np.argsort(-means, axis=1, kind="stable")[:, :min(k, channels)]  # (rows, k)
    picked = np.take_along_axis(value, index.reshape(*index.shape, *(1,) * (value.ndim - 2)),
                                axis=1)
    return picked, index
