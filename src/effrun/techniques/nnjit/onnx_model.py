"""A one-node ONNX MatMul model for onnxruntime-web, written as protobuf bytes directly.

The graph is `C = MatMul(A, B)`; B is a float32 initializer (a layer's constant weight: the
runtime may pre-pack it, as it would in deployment) or, for a batch matmul of two activations,
a second graph input. Only the handful of ModelProto fields this needs are encoded (field
numbers from onnx.proto3); the `onnx` wheel (~17 MB) is not needed for one node.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

FLOAT = 1            # TensorProto.DataType.FLOAT
IR_VERSION = 8
OPSET = 13


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b = n & 0x7F
        n >>= 7
        if n:
            out.append(b | 0x80)
        else:
            out.append(b)
            return bytes(out)


def _key(field: int, wire: int) -> bytes:
    return _varint((field << 3) | wire)


def _int(field: int, v: int) -> bytes:
    return _key(field, 0) + _varint(v)


def _bytes(field: int, b: bytes) -> bytes:
    return _key(field, 2) + _varint(len(b)) + b


def _str(field: int, s: str) -> bytes:
    return _bytes(field, s.encode())


def _value_info(name: str, dims: Sequence[int]) -> bytes:
    shape = b"".join(_bytes(1, _int(1, d)) for d in dims)           # Dimension.dim_value
    tensor_type = _int(1, FLOAT) + _bytes(2, shape)                  # elem_type, shape
    return _str(1, name) + _bytes(2, _bytes(1, tensor_type))          # name, TypeProto.tensor_type


def _tensor(name: str, arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype="<f4")
    dims = b"".join(_int(1, d) for d in arr.shape)
    return dims + _int(2, FLOAT) + _str(8, name) + _bytes(9, arr.tobytes())


def matmul_model(a_dims: Sequence[int], b_dims: Sequence[int], weight: Optional[np.ndarray] = None) -> bytes:
    """ONNX bytes for C = A @ B; B is an initializer when `weight` is given, else an input."""
    c_dims = list(a_dims[:-1]) + [b_dims[-1]]
    node = _str(1, "A") + _str(1, "B") + _str(2, "C") + _str(3, "matmul") + _str(4, "MatMul")
    graph = _bytes(1, node) + _str(2, "effrun_nnjit_matmul")
    if weight is not None:
        if tuple(weight.shape) != tuple(b_dims):
            raise ValueError(f"weight shape {weight.shape} != {tuple(b_dims)}")
        graph += _bytes(5, _tensor("B", weight))
    graph += _bytes(11, _value_info("A", a_dims))
    if weight is None:
        graph += _bytes(11, _value_info("B", b_dims))
    graph += _bytes(12, _value_info("C", c_dims))
    opset = _str(1, "") + _int(2, OPSET)
    return _int(1, IR_VERSION) + _str(2, "effrun") + _bytes(7, graph) + _bytes(8, opset)

