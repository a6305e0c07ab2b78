"""Open Inference Protocol tensors <-> numpy, with errors that name the offending field."""

from __future__ import annotations

import numpy as np

from explainers.base import Array
from explainers.errors import InvalidArgument
from service.models.onnx_model import OIP_TO_NUMPY
from sidelight.v1 import explainer_pb2 as pb

CONTENTS_FIELD = {
    "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
    "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
    "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
    "FP32": "fp32_contents", "FP64": "fp64_contents",
}
NUMPY_TO_OIP = {np.dtype(v): k for k, v in OIP_TO_NUMPY.items()}


def to_array(t: pb.Tensor, field: str) -> Array:
    """Decode a Tensor (raw little-endian bytes or typed contents) into an array of its shape."""
    datatype = t.datatype.upper()
    if datatype not in OIP_TO_NUMPY:
        raise InvalidArgument(f"{field}.datatype: {t.datatype!r} is not supported; use one of "
                              f"{', '.join(OIP_TO_NUMPY)}")
    shape = tuple(int(d) for d in t.shape)
    if not shape or any(d < 0 for d in shape):
        raise InvalidArgument(f"{field}.shape: {list(shape)} must be non-empty, batch first, >= 0")
    dtype = np.dtype(OIP_TO_NUMPY[datatype]).newbyteorder("<")
    count = int(np.prod(shape))
    raw = t.raw  # every read of a bytes field copies it: read it once
    if raw:
        if len(raw) != count * dtype.itemsize:
            raise InvalidArgument(f"{field}.raw: {len(raw)} bytes; shape {list(shape)} of "
                                  f"{datatype} needs {count * dtype.itemsize}")
        # a read-only view of those bytes; copied only on a big-endian machine
        return np.frombuffer(raw, dtype=dtype).astype(dtype.newbyteorder("="), copy=False)\
            .reshape(shape)
    return _from_contents(t, datatype, shape, count, field)


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
