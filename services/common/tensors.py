"""Tensor codec: torch tensors <-> t2v.v1.Tensor (raw little-endian bytes + shape + dtype).

Why raw bytes: embeddings and latents are a few hundred KB; a bytes field costs one copy and no
parsing. Every decode checks that the bytes match the declared shape and dtype, so a bad message
from a peer becomes a clear INVALID_ARGUMENT instead of a crash deep inside the model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from services.common.errors import InvalidArgument
from t2v.v1 import tensor_pb2

_TORCH_TO_PROTO = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
}
_PROTO_TO_TORCH = {v: k for k, v in _TORCH_TO_PROTO.items()}
# numpy has no bfloat16: its bytes travel as int16 and are reinterpreted by torch.
_NUMPY_CARRIER = {torch.float32: "<f4", torch.float16: "<f2", torch.bfloat16: "<i2"}

DTYPE_NAMES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class TensorError(InvalidArgument):
    """A Tensor message that cannot be decoded; the message says what is wrong."""


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def to_proto(tensor: torch.Tensor) -> tensor_pb2.Tensor:
    """Encode a floating tensor (any device) as a Tensor message."""
    if tensor.dtype not in _TORCH_TO_PROTO:
        raise TensorError(f"cannot send a {dtype_name(tensor.dtype)} tensor; use float32, float16 or bfloat16")
    if tensor.dim() == 0 or tensor.numel() == 0:
        raise TensorError(f"cannot send a tensor of shape {list(tensor.shape)}; every dimension must be positive")
    t = tensor.detach().to("cpu").contiguous()
    carrier = t.view(torch.int16) if t.dtype == torch.bfloat16 else t
    data = carrier.numpy().astype(_NUMPY_CARRIER[t.dtype], copy=False).tobytes()
    return tensor_pb2.Tensor(data=data, shape=list(t.shape), dtype=_TORCH_TO_PROTO[t.dtype])


def from_proto(message: tensor_pb2.Tensor, name: str = "tensor") -> torch.Tensor:
    """Decode a Tensor message, checking dtype, shape and byte length; raise TensorError otherwise."""
    if message.dtype not in _PROTO_TO_TORCH:
        label = tensor_pb2.DType.Name(message.dtype) if message.dtype in tensor_pb2.DType.values() else message.dtype
        raise TensorError(f"{name} has dtype {label}; expected DTYPE_FLOAT32, DTYPE_FLOAT16 or DTYPE_BFLOAT16")
    shape = tuple(int(d) for d in message.shape)
    if not shape or any(d <= 0 for d in shape):
        raise TensorError(f"{name} has shape {list(shape)}; every dimension must be positive")
    dtype = _PROTO_TO_TORCH[message.dtype]
    itemsize = torch.empty((), dtype=dtype).element_size()
    expected = math.prod(shape) * itemsize
    if len(message.data) != expected:
        raise TensorError(f"{name} declares shape {list(shape)} {dtype_name(dtype)} ({expected} bytes) "
                          f"but carries {len(message.data)} bytes")
    array = np.frombuffer(message.data, dtype=_NUMPY_CARRIER[dtype]).reshape(shape)
    tensor = torch.from_numpy(array.copy())
    return tensor.view(torch.bfloat16) if dtype == torch.bfloat16 else tensor


def check_finite(tensor: torch.Tensor, name: str) -> None:
    """NaN or Inf would silently turn a video black; refuse them at the door."""
    if not torch.isfinite(tensor).all():
        raise TensorError(f"{name} contains NaN or Inf values")
