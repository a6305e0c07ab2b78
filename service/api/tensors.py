"""Open Inference Protocol tensors <-> numpy, with errors that name the offending field."""

from __future__ import annotations

import math

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument, quoted
from service.models.onnx_model import OIP_TO_NUMPY
from sidelight.v1 import explainer_pb2 as pb

CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}
NUMPY_TO_OIP = {np.dtype(v): k for k, v in OIP_TO_NUMPY.items()}
MAX_RANK = 8  # tabular inputs are rank 1 or 2; assemble() then names the rank a model takes


def to_array(t: pb.Tensor, field: str, max_bytes: int) -> Array:
    """Decode a Tensor (raw little-endian bytes or typed contents) into an array of its shape.

    The shape is checked with exact integer arithmetic against `max_bytes` before anything is
    allocated: int64 dimensions whose product overflows are refused, not wrapped."""
    datatype = t.datatype.upper()
    if datatype not in OIP_TO_NUMPY:
        raise InvalidArgument(f"{field}.datatype: {quoted(t.datatype)} is not supported; use "
                              f"one of {', '.join(OIP_TO_NUMPY)}")
    dtype = np.dtype(OIP_TO_NUMPY[datatype]).newbyteorder("<")
    shape = check_shape(tuple(t.shape), dtype.itemsize, field, max_bytes)
    count = math.prod(shape)
    raw = t.raw  # every read of a bytes field copies it: read it once
    if raw:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(f"{field}.raw: {len(raw)} bytes; shape {list(shape)} of "
                                  f"{datatype} needs {count * dtype.itemsize}")
        # a read-only view of those bytes; copied only on a big-endian machine
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)\
            .reshape(shape)
    return _from_contents(t, datatype, shape, count, field)


def check_shape(shape: tuple[int, ...], itemsize: int, field: str,
                max_bytes: int) -> tuple[int, ...]:
    """A tensor shape that fits `max_bytes`: 1 to MAX_RANK dimensions, none negative.

    Python ints do not overflow; the extent ignores empty axes because numpy refuses shapes
    whose other dimensions overflow even when an axis is 0."""
    if not 1 <= len(shape) <= MAX_RANK:
        raise InvalidArgument(f"{field}.shape: {len(shape)} dimensions; tensors have 1 to "
                              f"{MAX_RANK}, batch first")
    negative = [k for k, d in enumerate(shape) if d < 0]
    if negative:
        raise InvalidArgument(f"{field}.shape: dimension {negative[0]} is {shape[negative[0]]}; "
                              f"dimensions must be >= 0")
    extent = math.prod(max(d, 1) for d in shape)
    if extent * itemsize > max_bytes:
        raise InvalidArgument(f"{field}.shape: {list(shape)} is too large: {extent} values of "
                              f"{itemsize} bytes; a request holds at most {max_bytes} bytes "
                              "(see max_upload_bytes)")
    return shape


def _from_contents(t: pb.Tensor, datatype: str, shape: tuple[int, ...], count: int,
                   field: str) -> Array:
    name = CONTENTS_FIELD.get(datatype)
    if name is None:
        raise InvalidArgument(f"{field}.raw: {datatype} must be sent as raw bytes")
    values = getattr(t.contents, name)
    if len(values) != count:
        raise InvalidArgument(f"{field}.contents.{name}: {len(values)} values; shape "
                              f"{list(shape)} needs {count}")
    return np.asarray(values, dtype=OIP_TO_NUMPY[datatype]).reshape(shape)


def from_array(name: str, array: Array) -> pb.Tensor:
    """Encode an array as a Tensor with little-endian raw bytes."""
    dtype = np.dtype(array.dtype)
    if dtype not in NUMPY_TO_OIP:
        raise InvalidArgument(f"{name}: dtype {dtype} has no OIP datatype")
    little = np.ascontiguousarray(array, dtype=dtype.newbyteorder("<"))
    return pb.Tensor(name=name, datatype=NUMPY_TO_OIP[dtype], shape=list(array.shape),
                     raw=little.tobytes())
