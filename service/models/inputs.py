"""How a model's inputs become the one flat element axis the explainers see, and back.

Every input is read batch first; the rest of its shape (the element shape: columns of a table,
C x H x W of an image, the positions of a token sequence) is flattened, and the inputs are
concatenated in the model's order. A `Layout` holds the element shapes of one request (symbolic
dimensions resolved from the request's tensors), so the same model serves 8 x 8 and 32 x 32
images, or sentences of any length, as the graph allows.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument

FLOAT_TYPES = ("FP32", "FP64", "FP16")
MODALITIES = ("tabular", "image", "text")
INTEGER_TYPES = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64", "BOOL")
NUMPY = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT8": np.int8,
         "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
         "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorInfo:
    """A model input or output as the graph declares it: name, OIP datatype, shape with -1 =
    symbolic (the batch axis first)."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def columns(self) -> int:
        """Elements per row when they are all known (1 for a rank-1 input), else -1."""
        return math.prod(self.element_dims) if self.static else -1

    @property
    def element_dims(self) -> tuple[int, ...]:
        """The shape without the batch axis; a rank-1 input has one element per row."""
        return self.shape[1:]

    @property
    def static(self) -> bool:
        return all(d >= 0 for d in self.element_dims)

    @property
    def integer(self) -> bool:
        return self.datatype in INTEGER_TYPES


@dataclass(frozen=True)
class Layout:
    """The element shape of every input for one request, and where each sits in a flat row."""

    specs: tuple[TensorInfo, ...]
    shapes: tuple[tuple[int, ...], ...]

    @staticmethod
    def resolve(specs: Sequence[TensorInfo], shapes: Sequence[Sequence[int]]) -> Layout:
        """Element shapes checked against the declared ones (symbolic dims take any size)."""
        out = []
        for i, (spec, shape) in enumerate(zip(specs, shapes, strict=True)):
            dims = tuple(int(d) for d in shape)
            declared = spec.element_dims
            if len(dims) != len(declared) or any(
                    d >= 0 and d != s for d, s in zip(declared, dims, strict=True)):
                want = ["N", *(d if d >= 0 else "?" for d in declared)]
                raise InvalidArgument(f"inputs[{i}].shape: got {['N', *dims]}, model input "
                                      f"{spec.name!r} takes {want}")
            if any(s < 1 for s in dims):
                raise InvalidArgument(f"inputs[{i}].shape: every axis needs at least one "
                                      f"element; got {['N', *dims]}")
            out.append(dims)
        return Layout(tuple(specs), tuple(out))

    @staticmethod
    def static_of(specs: Sequence[TensorInfo], default: int = 16) -> Layout:
        """The layout when nothing else says: symbolic dims take `default` (for probes)."""
        return Layout(tuple(specs), tuple(tuple(d if d >= 0 else default for d in s.element_dims)
                                          for s in specs))

    @staticmethod
    def of_rows(specs: Sequence[TensorInfo], row_shape: Sequence[int]) -> Layout | None:
        """The layout of a single-input model whose rows have `row_shape` (a background file
        saved as (rows, C, H, W), say), when it fits the declared shape; else None."""
        if len(specs) != 1:
            return None
        try:
            return Layout.resolve(specs, [row_shape])
        except InvalidArgument:
            return None

    @functools.cached_property
    def sizes(self) -> tuple[int, ...]:
        """Elements per input (cached: feeds reads it on every model call)."""
        return tuple(math.prod(s) for s in self.shapes)

    @functools.cached_property
    def offsets(self) -> tuple[int, ...]:
        """Where each input starts in a flat row, and the total at the end."""
        return tuple(int(v) for v in np.cumsum([0, *self.sizes]))

    @property
    def elements(self) -> int:
        return sum(self.sizes)

    @property
    def key(self) -> tuple[tuple[int, ...], ...]:
        return self.shapes

    def flatten(self, arrays: Sequence[Array]) -> Array:
        """Request tensors (rows, *shape) in model order -> one (rows, elements) float64 matrix."""
        rows = arrays[0].shape[0]
        return np.concatenate([np.asarray(a, np.float64).reshape(rows, -1) for a in arrays],
                              axis=1)

    def feeds(self, X: Array) -> dict[str, Array]:
        """A flat (rows, elements) matrix -> onnxruntime feeds in each input's dtype and shape."""
        out = {}
        for spec, shape, start, stop in zip(self.specs, self.shapes, self.offsets[:-1],
                                            self.offsets[1:], strict=True):
            part: Array = X[:, start:stop].astype(NUMPY[spec.datatype], copy=False)
            out[spec.name] = part.reshape(X.shape[0], *shape)
        return out

    def split(self, values: Array) -> list[Array]:
        """Per-element values (k, elements) -> one (k, *shape) array per input."""
        return [values[:, a:b].reshape(values.shape[0], *shape)
                for shape, a, b in zip(self.shapes, self.offsets[:-1], self.offsets[1:],
                                       strict=True)]

    def input_of(self, name: str) -> int:
        """The position of the input called `name` ("" = the first)."""
        if not name:
            return 0
        for k, spec in enumerate(self.specs):
            if spec.name == name:
                return k
        raise InvalidArgument(f"input: model has no input {name!r}; inputs: "
                              f"{', '.join(s.name for s in self.specs)}")


@dataclass(frozen=True)
class Modality:
    """How the inputs are read: the kind, the input it concerns (image, token ids) and, for
    images, which axes are spatial."""

    kind: str
    input: int = 0
    layout: str = ""

    def spatial_axes(self, rank: int) -> tuple[int, ...]:
        """Spatial axes of the image input's element shape (batch excluded)."""
        if self.layout == "NHWC":
            return tuple(range(rank - 1))
        if self.layout == "NCHW":
            return tuple(range(1, rank))
        return tuple(range(rank))


def infer_modality(specs: Sequence[TensorInfo], index_inputs: frozenset[str],
                   configured: str | None = None, image_layout: str | None = None) -> Modality:
    """Text: an integer input that indexes an embedding (feeds Gather); image: a float input
    of rank 3 or 4 (batch included); tabular otherwise. explain.yaml's `modality:` wins."""
    kinds = [_kind(s, index_inputs) for s in specs]
    kind = configured or next((k for k in ("text", "image") if k in kinds), "tabular")
    if kind not in MODALITIES:
        raise InvalidArgument(f"modality: {kind!r}; use one of {', '.join(MODALITIES)}")
    if kind == "tabular":
        return Modality("tabular")
    candidates = [i for i, k in enumerate(kinds) if k == kind] or [0]
    if kind == "text":
        return Modality("text", candidates[0])
    spec = specs[candidates[0]]
    return Modality("image", candidates[0], image_layout or _image_layout(spec.element_dims))


def _kind(spec: TensorInfo, index_inputs: frozenset[str]) -> str:
    if spec.name in index_inputs and len(spec.shape) == 2:
        return "text"
    if spec.datatype in FLOAT_TYPES and len(spec.shape) in (3, 4):
        return "image"
    return "tabular"


def _image_layout(dims: tuple[int, ...]) -> str:
    """NCHW when the first element axis looks like channels, NHWC when the last does."""
    if len(dims) == 2:
        return "HW"
    if dims[0] in (1, 3, 4) or dims[-1] not in (1, 3, 4):
        return "NCHW"
    return "NHWC"


TABULAR = Modality("tabular")
