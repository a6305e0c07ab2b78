"""numpy arrays <-> Open Inference Protocol tensors, for the client (no server code imported)."""

from __future__ import annotations

from typing import Any

import numpy as np

from sidelight.v1 import explainer_pb2 as pb

Array = np.ndarray[Any, Any]
DATATYPES: dict[str, Any] = {
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "INT8": np.int8,
    "INT16": np.int16, "INT32": np.int32, "INT64": np.int64, "UINT8": np.uint8,
    "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64, "BOOL": np.bool_,
}
CONTENTS = {"FP32": "fp32_contents", "FP64": "fp64_contents", "INT32": "int_contents",
            "INT64": "int64_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
            "BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
            "UINT8": "uint_contents", "UINT16": "uint_contents"}


def datatype_of(dtype: np.dtype[Any]) -> str:
    """The OIP name of a numpy dtype (ValueError for dtypes the protocol lacks)."""
    for name, kind in DATATYPES.items():
        if np.dtype(kind) == dtype:
            return name
    raise ValueError(f"dtype {dtype} has no tensor datatype; use floats, ints or bools")


def tensor(name: str, values: Array) -> pb.Tensor:
    """An array as a tensor of its own dtype, little-endian raw bytes, batch axis first."""
    dtype = np.dtype(values.dtype)
    little = np.ascontiguousarray(values, dtype=dtype.newbyteorder("<"))
    return pb.Tensor(name=name, datatype=datatype_of(dtype), shape=list(values.shape),
                     raw=little.tobytes())


def array(t: pb.Tensor) -> Array:
    """A tensor's values in its shape, from raw bytes or the typed contents field."""
    dtype = np.dtype(DATATYPES[t.datatype.upper()])
    if t.raw:
        return np.frombuffer(t.raw, dtype=dtype.newbyteorder("<")).astype(dtype)\
            .reshape(tuple(t.shape))
    values = getattr(t.contents, CONTENTS[t.datatype.upper()])
    return np.asarray(values, dtype=dtype).reshape(tuple(t.shape))
