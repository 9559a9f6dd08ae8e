"""Self-attention over short sequences (the UNet3D's temporal attention: 16 frames) as one Triton kernel.

Why: on an H200 the temporal attention was 56 of the compiled 32-row forward's 71 ms of attention
(docs/benchmarks.md, run D), at ~60 TFLOP/s: the fused SDPA kernels tile 64 queries x 128 keys and on a
sequence of 16 compute mostly padding, and two plain matrix products, compiled, were only 1.6x faster.
This kernel gives each (position, head) one small program: q, k and v of its 16 frames in registers,
``softmax(q k^T / sqrt(d)) v`` with the softmax in float32, one write. It is memory-bound by design:
it reads q, k and v once and writes the output once, what any attention must move.

``ShortAttnProcessor`` is diffusers' AttnProcessor2_0 for the case the UNet3D has (self-attention on a
[batch, sequence, channels] input, no mask, no norms on q/k): short sequences on a CUDA device go through
the kernel, everything else through AttnProcessor2_0 itself. ``install`` puts it on a UNet after a check
of the kernel against float32 attention on this GPU (with ``auto`` a kernel that fails it keeps SDPA and
says so; with ``triton`` the start stops).

Exact in the sense the product's other kernels are: the same operations up to fp16 rounding (SDPA's own
backends differ as much); the kernel registers as a ``torch.library.triton_op``, so torch.compile and
Dynamo's ahead-of-time compile see it in the graph, and CUDA graphs capture it like any kernel.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any, Iterable

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0

from services.common.logs import kv

log = logging.getLogger("denoiser.short_attention")

MAX_SEQUENCE = 32            # longer sequences go to SDPA (its tiles fit them; a 64-tile spills registers)
MAX_HEAD_DIM = 128
NUM_WARPS = 2                # a 16x64 tile: more warps only wait on each other
KINDS = ("auto", "triton", "sdpa")   # --short-attention: auto = triton where it is available, else sdpa
CHECK_TOLERANCE = 2e-2       # relative error against SDPA (float32 reference) the startup check allows
HALF = (torch.float16, torch.bfloat16)    # what the kernel computes in (float32 inputs keep SDPA)
# This file's code, in the precompiled packages' key (aot.module_state): a package traced with an older
# kernel or processor is rebuilt, never loaded (its first output is compared with eager's, which already
# runs the new code, within a tolerance: that would not notice a small change).
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]

try:                                                   # a CPU build of torch comes without Triton
    import triton
    import triton.language as tl
except ImportError:                                    # pragma: no cover - depends on the install
    triton = None
# Triton's interpreter (TRITON_INTERPRET=1, read when a kernel is defined) runs kernels on CPU tensors with
# numpy: how the CPU tests run this one (tests/unit/test_short_attention.py). Never for serving: slow.
INTERPRETED = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def available(device: torch.device) -> bool:
    """Whether the kernel can run here: Triton, and a CUDA device (any device under the interpreter)."""
    return triton is not None and (device.type == "cuda" or INTERPRETED)


def padded(n: int) -> int:
    """The kernel's tile side for a sequence or a head's width: a power of two of at least 16 (Triton's
    smallest dot); the padding is masked."""
    return max(16, 1 << (max(n, 1) - 1).bit_length())


if triton is not None:
    @triton.jit
    def _short_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, heads, sequence, dim, scale,
                                sqb, sqs, sqh, skb, sks, skh, svb, svs, svh, sob, sos, soh,
                                S: tl.constexpr, D: tl.constexpr):
        pid = tl.program_id(0)
        b = (pid // heads).to(tl.int64)
        h = (pid % heads).to(tl.int64)
        s = tl.arange(0, S)
        d = tl.arange(0, D)
        rows = (s[:, None] < sequence) & (d[None, :] < dim)
        q = tl.load(q_ptr + b * sqb + h * sqh + s[:, None] * sqs + d[None, :], mask=rows, other=0.0)
        k = tl.load(k_ptr + b * skb + h * skh + s[:, None] * sks + d[None, :], mask=rows, other=0.0)
        v = tl.load(v_ptr + b * svb + h * svh + s[:, None] * svs + d[None, :], mask=rows, other=0.0)
        scores = tl.dot(q, tl.trans(k)) * scale                      # float32 [S, S]
        scores = tl.where(s[None, :] < sequence, scores, float("-inf"))
        scores = scores - tl.max(scores, 1)[:, None]
        weights = tl.exp(scores)
        weights = weights / tl.sum(weights, 1)[:, None]
        out = tl.dot(weights.to(v.dtype), v)
        tl.store(o_ptr + b * sob + h * soh + s[:, None] * sos + d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=rows)

    @torch.library.triton_op("t2v::short_attention", mutates_args=())
    def short_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """[batch, sequence, heads, head_dim] q, k, v (last dimension contiguous) -> softmax(q k^T / sqrt(d)) v,
        the same layout, contiguous."""
        batch, sequence, heads, dim = q.shape
        torch._check(k.shape == q.shape and v.shape == q.shape, lambda: "q, k and v must have one shape")
        torch._check(q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1,
                     lambda: "q, k and v must be contiguous in their last dimension")
        out = torch.empty((batch, sequence, heads, dim), device=q.device, dtype=q.dtype)
        torch.library.wrap_triton(_short_attention_kernel)[(batch * heads,)](
            q, k, v, out, heads, sequence, dim, dim ** -0.5,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S=padded(sequence), D=padded(dim), num_warps=NUM_WARPS)
        return out


def head_dim(attn: Attention) -> int | None:
    """The width of one head of ``attn``'s q, k and v (as diffusers sized their projections, whatever module
    does them now: an FP8 or LoRA one too), or None when q's and k/v's differ or do not split evenly."""
    inner = int(attn.inner_dim)
    if getattr(attn, "inner_kv_dim", inner) != inner or inner % attn.heads:
        return None
    return inner // attn.heads


def fits(hidden_states: torch.Tensor, attn: Attention) -> bool:
    """Whether a [batch, sequence, channels] input's self-attention through ``attn`` is one the kernel takes."""
    dim = head_dim(attn)
    return (hidden_states.ndim == 3 and dim is not None and dim <= MAX_HEAD_DIM
            and (hidden_states.is_cuda or INTERPRETED) and hidden_states.dtype in HALF
            and hidden_states.shape[1] <= MAX_SEQUENCE)


class ShortAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0, but a short self-attention on the GPU runs as ``short_attention``. On an Attention
    whose projections diffusers fused (``fuse_projections``: one q/k/v matrix product instead of three, one
    k/v for a cross-attention) it reads the fused ones, and its fallback is FusedAttnProcessor2_0."""

    VERSION = CODE_VERSION

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        plain = (encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
                 and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None and not args
                 and not kwargs)
        fused = bool(getattr(attn, "fused_projections", False))
        if not plain or not fits(hidden_states, attn):
            fallback = FusedAttnProcessor2_0 if fused else AttnProcessor2_0
            return fallback.__call__(self, attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                     *args, **kwargs)
        residual = hidden_states
        batch, sequence, _ = hidden_states.shape
        if fused:                                     # strided views of one product: the kernel takes them
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        split = (batch, sequence, attn.heads, query.shape[-1] // attn.heads)
        out = short_attention(query.view(split), key.view(split), value.view(split))
        out = attn.to_out[1](attn.to_out[0](out.view(batch, sequence, query.shape[-1])))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def check(device: torch.device, dtype: torch.dtype, head_dims: Iterable[int] = (64,)) -> float:
    """The kernel's worst relative error against float32 attention on random inputs on this device, for each
    of ``head_dims`` and each tile it compiles for sequences: 16 frames, a sequence that is not a power of
    two, and one of the 32-row tile (so no variant is first built, unchecked, inside a request)."""
    worst = 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    for dim in sorted(set(head_dims)):
        for sequence in (16, 13, 24):
            q, k, v = (torch.randn(24, sequence, 2, dim, device=device, dtype=dtype, generator=generator)
                       for _ in range(3))
            reference = torch.nn.functional.scaled_dot_product_attention(
                *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
            got = short_attention(q, k, v).float()
            worst = max(worst, float((got - reference).norm() / reference.norm()))
    return worst


def install(unet: torch.nn.Module, kind: str, device: torch.device, dtype: torch.dtype) -> str:
    """Put ShortAttnProcessor on every attention of ``unet`` (any module holding diffusers Attentions) for
    ``kind`` "triton", or "auto" where the kernel can run, after ``check`` on this device with the model's
    head widths; returns the kind in use: "triton" or "sdpa" (also for float32, which the kernel does not
    compute in). For "triton", raises ValueError where the kernel cannot run or does not pass the check;
    "auto" logs why and keeps SDPA."""
    if kind not in KINDS:
        raise ValueError(f"short attention {kind!r} is unknown; choose {' or '.join(KINDS)}")
    if kind == "sdpa" or (kind == "auto" and not (available(device) and dtype in HALF)):
        return "sdpa"
    if not available(device) or dtype not in HALF:
        raise ValueError(f"--short-attention triton needs a CUDA device, Triton and fp16 or bf16; this engine "
                         f"runs on {device} in {str(dtype).removeprefix('torch.')}"
                         + ("" if triton is not None else ", and Triton is not installed"))
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    dims = {d for d in map(head_dim, attentions) if d is not None and d <= MAX_HEAD_DIM}
    try:
        error = check(device, dtype, dims or (64,))
        problem = "" if error <= CHECK_TOLERANCE else f"relative error {error:.2e} > {CHECK_TOLERANCE}"
    except Exception as failure:  # noqa: BLE001 - a kernel that does not build here (Triton, the GPU)
        error, problem = float("nan"), f"{type(failure).__name__}: {failure}"[:300]
    if problem:
        if kind == "triton":
            raise ValueError(f"--short-attention triton: the kernel fails its check on {device} ({problem}); "
                             "use --short-attention sdpa")
        log.warning(kv("short_attention_unusable", problem=problem,
                       fix="kept scaled_dot_product_attention; report the GPU and the Triton version"))
        return "sdpa"
    for attention in attentions:
        attention.set_processor(ShortAttnProcessor())
    log.info(kv("short_attention", kernel="triton", attentions=len(attentions),
                head_dims=",".join(map(str, sorted(dims))), rel_err=f"{error:.2e}"))
    return "triton"
