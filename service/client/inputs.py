"""What a caller passes to `Client.explain` (numpy arrays, DataFrames, dicts of arrays, texts)
as the model's input tensors, checked against the model's `ModelInfo` so mistakes are named
before anything is sent."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from service.client.wire import DATATYPES, Array, tensor
from sidelight.v1 import explainer_pb2 as pb

WORD = re.compile(r"[\w'-]+")  # a text's words: letters, digits, apostrophes and hyphens
PAD_ID = 0  # the bundled text models pad with id 0 (explain.yaml text.pad_token)


@dataclass(frozen=True)
class Inputs:
    """The model inputs of one request: name -> (rows, *input shape), in the model's order."""

    arrays: dict[str, Array]
    ignored: tuple[str, ...] = ()  # DataFrame or file columns that are no model feature

    @property
    def rows(self) -> int:
        return len(next(iter(self.arrays.values())))

    def tensors(self) -> list[pb.Tensor]:
        return [tensor(name, values) for name, values in self.arrays.items()]

    def slice(self, start: int, stop: int) -> Inputs:
        """Rows start..stop of every input (views, no copies)."""
        return Inputs({k: v[start:stop] for k, v in self.arrays.items()}, self.ignored)


def prepare(info: pb.ModelInfo, X: Any) -> Inputs:
    """Inputs from an array, a DataFrame (columns matched to feature names), a dict of arrays
    (input name -> array), or texts (a string or a list of strings, for text models)."""
    if isinstance(X, str) or (isinstance(X, Sequence) and X and isinstance(X[0], str)):
        return Inputs({text_input(info).name: tokenize(info, [X] if isinstance(X, str) else X)})
    if isinstance(X, Mapping):
        return from_mapping(info, X)
    if hasattr(X, "columns") and hasattr(X, "to_numpy"):  # a pandas DataFrame, duck-typed
        return from_columns(info, [str(c) for c in X.columns], X.to_numpy())
    return from_array(info, np.asarray(X))


def from_mapping(info: pb.ModelInfo, X: Mapping[str, Any]) -> Inputs:
    """One array per named model input, every input present."""
    specs = {s.name: s for s in info.inputs}
    unknown = sorted(set(X) - set(specs))
    missing = [n for n in specs if n not in X]
    if unknown or missing:
        raise ValueError(f"inputs of model {info.name}: {sorted(specs)}; "
                         f"missing {missing}, unknown {unknown}")
    arrays = {n: conform(specs[n], np.asarray(X[n])) for n in specs}
    return checked_rows(arrays)


def from_array(info: pb.ModelInfo, X: Array) -> Inputs:
    """One model input: X shaped like it (a missing batch axis means one row). Several
    inputs: tabular columns side by side, split by each input's width."""
    if len(info.inputs) == 1:
        spec = info.inputs[0]
        if X.ndim == len(spec.shape) - 1:
            X = X[None]
        return Inputs({spec.name: conform(spec, X)})
    X = X[None] if X.ndim == 1 else X
    widths = [int(np.prod(s.shape[1:])) if len(s.shape) > 1 else 1 for s in info.inputs]
    if X.ndim != 2 or X.shape[1] != sum(widths) or min(widths) < 1:
        raise ValueError(f"X: shape {list(X.shape)}; model {info.name} takes {sum(widths)} "
                         f"columns over inputs {[s.name for s in info.inputs]}; pass a dict "
                         "of arrays instead")
    edges = np.cumsum([0, *widths])
    return checked_rows({s.name: conform(s, X[:, a:b].reshape(len(X), *s.shape[1:]))
                         for s, a, b in zip(info.inputs, edges[:-1], edges[1:], strict=True)})


def from_columns(info: pb.ModelInfo, columns: list[str], values: Array) -> Inputs:
    """Named columns (a DataFrame, a CSV header) reordered to the model's features; extra
    columns are left out and reported."""
    ordered = values[:, feature_columns(info, columns)]  # (rows, features)
    ignored = tuple(c for c in columns if c not in set(info.feature_names))
    return Inputs(from_array(info, ordered).arrays, ignored)


def feature_columns(info: pb.ModelInfo, columns: Sequence[str]) -> list[int]:
    """The position of each model feature among `columns` (ValueError naming the missing)."""
    names = list(info.feature_names)
    where = {c: k for k, c in enumerate(columns)}
    missing = [n for n in names if n not in where]
    if missing:
        raise ValueError(f"columns: model {info.name} needs {len(names)} features; missing "
                         f"{', '.join(map(repr, missing[:5]))}"
                         + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    return [where[n] for n in names]


def conform(spec: pb.TensorSpec, X: Array) -> Array:
    """X in a dtype the input takes, its rank and fixed dimensions checked."""
    want = list(spec.shape)
    if X.ndim != len(want) or any(w >= 0 and w != d for w, d in zip(want[1:], X.shape[1:],
                                                                     strict=True)):
        shown = ["rows", *("*" if w < 0 else str(w) for w in want[1:])]
        raise ValueError(f"input {spec.name!r}: shape {list(X.shape)}; the model takes "
                         f"[{', '.join(shown)}]")
    if spec.datatype.startswith(("INT", "UINT", "BOOL")):
        return integral(spec, X)
    if X.dtype in (np.float32, np.float64):
        return X
    return X.astype(np.float64)


def integral(spec: pb.TensorSpec, X: Array) -> Array:
    """Ids and flags: whole numbers only, in the input's own dtype."""
    dtype = np.dtype(DATATYPES[spec.datatype])
    if X.dtype.kind == "f" and not np.array_equal(X, np.round(X)):
        raise ValueError(f"input {spec.name!r} takes {spec.datatype} values; got fractions")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"input {spec.name!r} takes {spec.datatype} values; got {X.dtype}")
    return X.astype(dtype)


def checked_rows(arrays: dict[str, Array]) -> Inputs:
    counts = {n: len(a) for n, a in arrays.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"inputs: different row counts {counts}")
    return Inputs(arrays)


def text_input(info: pb.ModelInfo) -> pb.TensorSpec:
    """The token-id input of a text model."""
    if info.modality != "text" or not info.vocabulary:
        raise ValueError(f"model {info.name} reads {info.modality or 'tabular'} inputs; texts "
                         "need a text model with a vocabulary")
    return next((s for s in info.inputs if s.datatype.startswith(("INT", "UINT"))),
                info.inputs[0])


def tokenize(info: pb.ModelInfo, texts: Sequence[str]) -> Array:
    """Texts as token ids (rows, length), padded with id 0 to the input's length. A word that
    is not in the vocabulary is an error naming it (it is never silently masked)."""
    spec = text_input(info)
    ids = {w: i for i, w in enumerate(info.vocabulary)}
    rows = [[ids.get(w, ids.get(w.lower(), -1)) for w in WORD.findall(t)] for t in texts]
    unknown = sorted({w for t, r in zip(texts, rows, strict=True)
                      for w, i in zip(WORD.findall(t), r, strict=True) if i < 0})
    if unknown:
        raise ValueError(f"text: {', '.join(map(repr, unknown[:10]))} not in the vocabulary of "
                         f"model {info.name} ({len(ids)} words)")
    length = spec.shape[-1] if spec.shape[-1] > 0 else max(map(len, rows))
    long = [k for k, r in enumerate(rows) if len(r) > length]
    if long or not all(rows):
        raise ValueError(f"text {long[0] if long else rows.index([])}: 1 to {length} words "
                         f"(model {info.name}'s input length)")
    out = np.full((len(rows), length), PAD_ID, np.int64)  # (rows, length)
    for k, r in enumerate(rows):
        out[k, :len(r)] = r
    return integral(spec, out)


def groups(mask: Array | None = None, grid: int | Sequence[int] | None = None,
           patch: int | Sequence[int] | None = None, labels: Sequence[str] = (),
           input: str = "") -> pb.FeatureGroups | None:
    """The request's players: a client mask (group id per element), a grid or a patch size."""
    if mask is None and grid is None and patch is None:
        return None
    given = sum(x is not None for x in (mask, grid, patch))
    if given > 1:
        raise ValueError("groups: give one of mask, grid or patch")
    return pb.FeatureGroups(
        mask=tensor("mask", np.asarray(mask, np.int64)) if mask is not None else None,
        grid=sizes(grid), patch=sizes(patch), labels=list(labels), input=input)


def sizes(value: int | Sequence[int] | None) -> list[int]:
    return [] if value is None else [int(value)] if isinstance(value, int) else list(value)


def baseline(kind: str | None, value: float = 0.0, sigma: float = 0.0) -> pb.Baseline | None:
    """What replaces a removed group: "zeros", "mean", "blur", "constant", "mask", ..."""
    return None if not kind else pb.Baseline(kind=kind, value=value, sigma=sigma)
