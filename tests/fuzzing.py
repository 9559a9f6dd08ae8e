"""What the bad-input tests share: one way to call an RPC with a deadline and read its outcome, the
"a refusal is a sentence" check, and hypothesis strategies for hostile values.

Why one module: every fuzz test asks the same questions of an answer (which status, is its text a
sentence a user can act on, did it come back at all), and the hostile values (huge ints, NaN, random
tensor bytes, path-like ids) are the same whichever server receives them.
"""

from __future__ import annotations

import math
import re
import unicodedata
from dataclasses import dataclass
from typing import Any, Callable

import grpc
import numpy as np
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from t2v.v1 import tensor_pb2

CALL_TIMEOUT = 30.0       # seconds: every call has a deadline, so a hang fails the case instead of the run
INT32 = (-2**31, 2**31 - 1)
INT64 = (-2**63, 2**63 - 1)
ITEMSIZE = {tensor_pb2.DTYPE_FLOAT32: 4, tensor_pb2.DTYPE_FLOAT16: 2, tensor_pb2.DTYPE_BFLOAT16: 2}
_NUMPY = {tensor_pb2.DTYPE_FLOAT32: "<f4", tensor_pb2.DTYPE_FLOAT16: "<f2"}

# Text that betrays a crash rather than a refusal: a traceback, a repr, gRPC's stock text for an
# exception that escaped a servicer, or the INTERNAL wrapper's own sentence.
_NOT_A_SENTENCE = re.compile(r"Traceback \(most recent call last\)|File \"|Exception calling application|"
                             r"Exception iterating responses|object at 0x|internal error \(")


def fuzz_settings(max_examples: int) -> settings:
    """Cheap cases, no per-case deadline (a loaded 2-core CI machine is slow, the gRPC deadline guards
    hangs), no example database (nothing written into the work tree)."""
    return settings(max_examples=max_examples, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


def shows_something(text: str) -> bool:
    """A prompt the gateway must take: at least one character that is not whitespace, a control or format
    character (zero-width, BOM, bidi mark) or a blank letter (Hangul filler, braille blank)."""
    blank = set("\u115f\u1160\u3164\uffa0\u2800")
    return any(not c.isspace() and c not in blank and unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp")
               for c in text)


def assert_sentence(text: str | None, what: str = "the refusal") -> None:
    """``text`` reads as a sentence a user can act on: words, not empty, not a traceback or a repr."""
    assert text and text.strip(), f"{what} has no text"
    assert len(text.split()) >= 3, f"{what} is not a sentence: {text!r}"
    assert not _NOT_A_SENTENCE.search(text), f"{what} looks like a crash, not a sentence: {text[:300]!r}"


@dataclass
class Outcome:
    """How a call ended: ``code`` OK with the answer (a list of messages for a stream), or a status."""

    code: grpc.StatusCode
    details: str = ""
    answer: Any = None

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


@dataclass
class Drawn:
    """A drawn request, the fields it breaks and whether it carries extreme values. Its repr, which
    hypothesis prints for a failing case, shows tensors by shape, dtype and size: their bytes can be
    megabytes."""

    request: Any
    broken: frozenset[str] = frozenset()
    extreme: bool = False

    def __repr__(self) -> str:
        shown = type(self.request)()
        shown.CopyFrom(self.request)
        for field, value in shown.ListFields():
            if isinstance(value, tensor_pb2.Tensor):
                value.data = f"<{len(value.data)} bytes>".encode()
        text = " ".join(str(shown).split())
        return f"Drawn(broken={sorted(self.broken)}, extreme={self.extreme}, request={text[:2000]})"


def outcome(call: Callable[[], Any]) -> Outcome:
    """Run ``call`` (which must pass its own ``timeout``), reading a stream to its end."""
    try:
        answer = call()
        if hasattr(answer, "__iter__") and hasattr(answer, "cancel"):   # a server stream
            answer = list(answer)
        return Outcome(grpc.StatusCode.OK, answer=answer)
    except grpc.RpcError as error:
        return Outcome(error.code(), error.details() or "")


def call_drawn(drawn: Drawn, call: Callable[[Any], Any], what: str) -> Outcome | None:
    """Make ``call(drawn.request)``; a broken request must be refused INVALID_ARGUMENT with a sentence,
    one with extreme values may be. Returns the answered outcome to check further, or None when the
    request was (rightly) refused."""
    from hypothesis import event

    event(f"broken: {', '.join(sorted(drawn.broken)) or ('nothing, extreme values' if drawn.extreme else 'nothing')}")
    result = outcome(lambda: call(drawn.request))
    invalid = {grpc.StatusCode.INVALID_ARGUMENT}
    if drawn.broken:
        check_refusal(result, invalid, f"{what} breaking {sorted(drawn.broken)}")
        return None
    if drawn.extreme and not result.ok:
        check_refusal(result, invalid, f"{what} with extreme values")
        return None
    assert result.ok, f"a valid {what} was refused: {result.code.name} {result.details!r}"
    return result


def check_refusal(result: Outcome, allowed: set[grpc.StatusCode], what: str) -> None:
    """A refused call: one of the ``allowed`` codes (never INTERNAL / UNKNOWN / DEADLINE_EXCEEDED, i.e.
    a crash or a hang), with a sentence."""
    assert result.code in allowed, f"{what}: {result.code.name} {result.details[:300]!r}"
    assert_sentence(result.details, what)


# --- strategies ---------------------------------------------------------------------------------------
def int32s() -> st.SearchStrategy[int]:
    """Any int32, leaning on the edges."""
    return st.one_of(st.integers(*INT32), st.sampled_from([0, -1, 1, INT32[0], INT32[1], 2**16 + 1, 1 << 30]))


def int64s() -> st.SearchStrategy[int]:
    return st.one_of(st.integers(*INT64), st.sampled_from([0, -1, INT64[0], INT64[1], 2**53 + 1]))


def odd_floats() -> st.SearchStrategy[float]:
    """float32 values a validator must think about: NaN, infinities, -0.0, tiny, huge, negative."""
    return st.one_of(st.floats(width=32), st.sampled_from([math.nan, math.inf, -math.inf, -0.0, -1.0, 3.0e38,
                                                          1.0e-45]))


def hostile_texts(max_size: int = 64, min_size: int = 0, nul: bool = True) -> st.SearchStrategy[str]:
    """Unicode of every category (control characters, NUL unless ``nul`` is False, RTL marks, emoji,
    combining marks; never a lone surrogate, which protobuf cannot carry), plus a few fixed nasties."""
    alphabet = st.characters(codec="utf-8", exclude_characters="" if nul else "\x00")
    nasties = ["", " ", "\x00", "\t\n\r", "\u202e\u200d\ufeff", "\U0001F600" * 8, "e\u0301" * 10, "%s%n{0}",
               "'; DROP TABLE jobs; --", "../" * 5]
    return st.one_of(st.text(alphabet, min_size=min_size, max_size=max_size),
                     st.sampled_from([t for t in nasties if len(t) >= min_size and (nul or "\x00" not in t)]))


PATH_LIKE_IDS = ["../", "../../etc/passwd", "/etc/passwd", "..\\..\\windows", "results/../jobs.sqlite3",
                 "jobs.sqlite3", "%2e%2e%2f", "0" * 32 + "/../x", "../" + "0" * 29, "\x00" * 32,
                 "0" * 31 + "\x00", "0" * 16 + "\x00" + "0" * 15, "0" * 32 + "\n", " " + "0" * 31, "A" * 32,
                 "f" * 31, "f" * 33, "0" * 32 + ".mp4", "~/.ssh/id_rsa", "file:///etc/passwd", "\u0660" * 32]


def job_ids(known: list[str]) -> st.SearchStrategy[str]:
    """Ids a client might send: path-like, NUL bytes, near misses of the real form, well-formed but
    unknown, random text, and (when given) the ids of real jobs."""
    hexes = st.text(alphabet="0123456789abcdef", min_size=32, max_size=32)
    choices = [st.sampled_from(PATH_LIKE_IDS), hexes, st.text(max_size=80),
               st.text(alphabet="0123456789abcdefABCDEF./\\\x00", max_size=40)]
    return st.one_of(choices[:1] + [st.sampled_from(known)] + choices[1:] if known else choices)


def random_data(draw: Callable[[st.SearchStrategy[Any]], Any], size: int) -> bytes:
    """``size`` random bytes from a drawn seed (hypothesis cannot draw megabytes itself)."""
    return np.random.default_rng(draw(st.integers(0, 2**32 - 1))).bytes(size)


def values_bytes(draw: Callable[[st.SearchStrategy[Any]], Any], shape: list[int], dtype: int,
                 poison: float | None = None, scale: float = 1.0) -> bytes:
    """Normal values of ``shape`` as ``dtype`` bytes, ``poison`` (NaN, Inf, ...) at one drawn place."""
    count = math.prod(shape)
    values = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).standard_normal(count).astype(np.float32)
    values *= np.float32(scale)
    if poison is not None:
        values[draw(st.integers(0, count - 1))] = poison
    if dtype == tensor_pb2.DTYPE_BFLOAT16:            # numpy has no bfloat16: keep the top half of each float32
        return (values.view("<u4") >> 16).astype("<u2").tobytes()
    return values.astype(_NUMPY[dtype]).tobytes()


@st.composite
def broken_tensors(draw: Callable[[st.SearchStrategy[Any]], Any], good: list[int],
                   fixed_axes: tuple[int, ...]) -> tensor_pb2.Tensor:
    """A Tensor message that a stage expecting shape ``good`` must refuse: a dtype the codec does not
    know, one of the ``fixed_axes`` off, the wrong rank, zero or negative or absurd dimensions, bytes
    that do not match the shape, or NaN / Inf among otherwise good values."""
    kind = draw(st.sampled_from(["dtype", "dimension", "rank", "odd_shape", "length", "poison"]))
    dtype = draw(st.sampled_from(list(ITEMSIZE)))
    shape = list(good)
    if kind == "dtype":
        bad_dtype = draw(st.one_of(st.sampled_from([tensor_pb2.DTYPE_UNSPECIFIED, 4, 99, -1]), int32s()))
        if bad_dtype in ITEMSIZE:
            bad_dtype = tensor_pb2.DTYPE_UNSPECIFIED
        return tensor_pb2.Tensor(data=random_data(draw, math.prod(shape) * 4), shape=shape, dtype=bad_dtype)
    if kind == "odd_shape":
        shape = draw(st.lists(int64s(), max_size=6).filter(
            lambda s: not s or any(d <= 0 for d in s) or math.prod(s) > 1 << 26))
        return tensor_pb2.Tensor(data=random_data(draw, draw(st.integers(0, 4096))), shape=shape, dtype=dtype)
    if kind == "length":
        size = math.prod(shape) * ITEMSIZE[dtype]
        wrong = draw(st.one_of(st.integers(0, size - 1), st.integers(size + 1, 2 * size), st.just(size // 2)))
        return tensor_pb2.Tensor(data=random_data(draw, wrong), shape=shape, dtype=dtype)
    poison = None
    if kind == "dimension":
        axis = draw(st.sampled_from(fixed_axes))
        shape[axis] = draw(st.integers(1, 2 * good[axis] + 2).filter(lambda d: d != good[axis]))
    elif kind == "rank":
        shape = draw(st.sampled_from([shape[1:], [1] + shape, [math.prod(shape)]]))
    else:
        poison = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
    return tensor_pb2.Tensor(data=values_bytes(draw, shape, dtype, poison), shape=shape, dtype=dtype)


@st.composite
def good_tensors(draw: Callable[[st.SearchStrategy[Any]], Any], shape: list[int],
                 extreme: bool = False) -> tensor_pb2.Tensor:
    """A well-formed Tensor of ``shape`` in any of the three dtypes; ``extreme``: finite values near the
    dtype's limit, which a stage may accept or refuse but must never turn into NaN silently."""
    dtype = draw(st.sampled_from(list(ITEMSIZE)))
    scale = 1.0
    if extreme:
        scale = draw(st.sampled_from([1e4, 6e3, 1e30, 1e-30])) if dtype != tensor_pb2.DTYPE_FLOAT16 else 1e4
    return tensor_pb2.Tensor(data=values_bytes(draw, shape, dtype, scale=scale), shape=shape, dtype=dtype)
