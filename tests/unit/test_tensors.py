"""services.common.tensors: the torch <-> t2v.v1.Tensor codec and its checks."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.errors import InvalidArgument
from services.common.tensors import TensorError, check_finite, from_proto, to_proto
from t2v.v1 import tensor_pb2

FLOAT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
PROTO_DTYPE = {
    torch.float32: tensor_pb2.DTYPE_FLOAT32,
    torch.float16: tensor_pb2.DTYPE_FLOAT16,
    torch.bfloat16: tensor_pb2.DTYPE_BFLOAT16,
}


def _sample(dtype: torch.dtype, shape: tuple[int, ...] = (2, 4, 3, 5, 6)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1234)
    values = torch.randn(shape, generator=generator) * 3
    # A few values that expose byte-order or sign mistakes.
    flat = values.view(-1)
    flat[0], flat[1], flat[2] = -0.0, 1.0, -2.5
    return values.to(dtype)


def _assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    # Bitwise comparison: exact equality, signed zeros included.
    carrier = torch.int32 if a.dtype == torch.float32 else torch.int16
    assert torch.equal(a.contiguous().view(carrier), b.contiguous().view(carrier))


def _assert_sentence(message: str, name: str = "latents") -> None:
    assert name in message, f"message does not name the tensor: {message!r}"
    assert len(message.split()) >= 4, f"message is not a sentence: {message!r}"
    assert "Traceback" not in message


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_is_exact(dtype: torch.dtype) -> None:
    tensor = _sample(dtype)
    message = to_proto(tensor)
    assert message.dtype == PROTO_DTYPE[dtype]
    assert list(message.shape) == list(tensor.shape)
    assert len(message.data) == tensor.numel() * tensor.element_size()
    _assert_same(from_proto(message, name="latents"), tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_survives_serialization(dtype: torch.dtype) -> None:
    tensor = _sample(dtype, (3, 7))
    wire = to_proto(tensor).SerializeToString()
    _assert_same(from_proto(tensor_pb2.Tensor.FromString(wire)), tensor)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_round_trip_of_non_contiguous_tensor(dtype: torch.dtype) -> None:
    base = _sample(dtype, (2, 3, 4, 5))
    views = [base.permute(0, 2, 1, 3), base.transpose(-1, -2), base[:, ::2, 1:, ::2]]
    for view in views:
        assert not view.is_contiguous()
        decoded = from_proto(to_proto(view))
        assert decoded.shape == view.shape
        _assert_same(decoded, view)


def test_bytes_are_little_endian_c_order() -> None:
    tensor = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=torch.float32).t()  # non-contiguous
    message = to_proto(tensor)
    assert message.data == torch.tensor([1.0, 3.0, 2.0, 4.0]).numpy().astype("<f4").tobytes()


def test_decoded_tensor_is_writable_and_owns_its_memory() -> None:
    message = to_proto(torch.zeros(4))
    decoded = from_proto(message)
    decoded += 1  # a tensor over the message's read-only bytes would fail or warn here
    assert torch.equal(decoded, torch.ones(4))
    assert torch.equal(from_proto(message), torch.zeros(4))


def test_tensor_error_is_invalid_argument() -> None:
    assert issubclass(TensorError, InvalidArgument)


def _message(dtype: int = tensor_pb2.DTYPE_FLOAT32, shape: list[int] | None = None,
             data: bytes | None = None) -> tensor_pb2.Tensor:
    shape = [2, 3] if shape is None else shape
    if data is None:
        data = bytes(4 * max(0, math.prod(shape)))
    return tensor_pb2.Tensor(data=data, shape=shape, dtype=dtype)


@pytest.mark.parametrize(
    "message, words",
    [
        pytest.param(_message(dtype=tensor_pb2.DTYPE_UNSPECIFIED), ["DTYPE_UNSPECIFIED"], id="unspecified-dtype"),
        pytest.param(_message(dtype=99), ["99"], id="unknown-enum"),
        pytest.param(_message(shape=[], data=b"\0" * 4), ["shape"], id="empty-shape"),
        pytest.param(_message(shape=[2, 0], data=b""), ["shape", "positive"], id="zero-dim"),
        pytest.param(_message(shape=[2, -3], data=b"\0" * 24), ["shape", "positive"], id="negative-dim"),
        pytest.param(_message(shape=[2, 3], data=b"\0" * 23), ["24", "23"], id="too-few-bytes"),
        pytest.param(_message(shape=[2, 3], data=b"\0" * 28), ["24", "28"], id="too-many-bytes"),
        pytest.param(_message(dtype=tensor_pb2.DTYPE_FLOAT16, shape=[2, 3], data=b"\0" * 24), ["12", "24"],
                     id="float32-bytes-declared-float16"),
    ],
)
def test_from_proto_refuses_bad_messages(message: tensor_pb2.Tensor, words: list[str]) -> None:
    with pytest.raises(TensorError) as info:
        from_proto(message, name="latents")
    text = str(info.value)
    _assert_sentence(text)
    assert info.value.message == text
    for word in words:
        assert word in text


def test_from_proto_default_name_is_used_without_name() -> None:
    with pytest.raises(TensorError, match="tensor"):
        from_proto(_message(dtype=tensor_pb2.DTYPE_UNSPECIFIED))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_check_finite_refuses_nan_and_inf(dtype: torch.dtype, bad: float) -> None:
    tensor = torch.zeros(2, 3, dtype=dtype)
    tensor[1, 2] = bad
    with pytest.raises(TensorError) as info:
        check_finite(tensor, "latents")
    _assert_sentence(str(info.value))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_check_finite_accepts_finite_values(dtype: torch.dtype) -> None:
    check_finite(_sample(dtype), "latents")  # must not raise


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.float64, torch.bool], ids=str)
def test_to_proto_refuses_other_dtypes(dtype: torch.dtype) -> None:
    with pytest.raises(TensorError) as info:
        to_proto(torch.zeros(2, 2, dtype=dtype))
    text = str(info.value)
    assert str(dtype).removeprefix("torch.") in text
    assert "float32" in text
