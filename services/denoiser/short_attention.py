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
of the kernel against scaled_dot_product_attention on this GPU (a mismatch keeps SDPA and says so).

Exact in the sense the product's other kernels are: the same operations up to fp16 rounding (SDPA's own
backends differ as much); the kernel registers as a ``torch.library.triton_op``, so torch.compile and
Dynamo's ahead-of-time compile see it in the graph, and CUDA graphs capture it like any kernel.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from services.common.logs import kv

log = logging.getLogger("denoiser.short_attention")

MAX_SEQUENCE = 32            # longer sequences go to SDPA (its tiles fit them; a 64-tile spills registers)
MAX_HEAD_DIM = 128
NUM_WARPS = 2                # a 16x64 tile: more warps only wait on each other
KINDS = ("auto", "triton", "sdpa")   # --short-attention: auto = triton where it is available, else sdpa
CHECK_TOLERANCE = 2e-2       # relative error against SDPA (float32 reference) the startup check allows

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
        out = torch.empty((batch, sequence, heads, dim), device=q.device, dtype=q.dtype)
        torch.library.wrap_triton(_short_attention_kernel)[(batch * heads,)](
            q, k, v, out, heads, sequence, dim, dim ** -0.5,
            q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
            S=padded(sequence), D=padded(dim), num_warps=NUM_WARPS)
        return out


def fits(hidden_states: torch.Tensor, heads: int) -> bool:
    """Whether a [batch, sequence, channels] input's self-attention is one the kernel takes."""
    if hidden_states.ndim != 3 or hidden_states.shape[-1] % heads:
        return False
    return ((hidden_states.is_cuda or INTERPRETED) and hidden_states.dtype in (torch.float16, torch.bfloat16)
            and hidden_states.shape[1] <= MAX_SEQUENCE and hidden_states.shape[-1] // heads <= MAX_HEAD_DIM)


class ShortAttnProcessor(AttnProcessor2_0):
    """AttnProcessor2_0, but a short self-attention on the GPU runs as ``short_attention``."""

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        plain = (encoder_hidden_states is None and attention_mask is None and attn.spatial_norm is None
                 and attn.group_norm is None and attn.norm_q is None and attn.norm_k is None and not args
                 and not kwargs)
        if not plain or not fits(hidden_states, attn.heads):
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        batch, sequence, _ = hidden_states.shape
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        head_dim = key.shape[-1] // attn.heads
        split = (batch, sequence, attn.heads, head_dim)
        out = short_attention(query.view(split), key.view(split), value.view(split))
        out = attn.to_out[1](attn.to_out[0](out.view(batch, sequence, attn.heads * head_dim)))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def check(device: torch.device, dtype: torch.dtype) -> float:
    """The kernel's relative error against float32 attention on random inputs of the temporal shape (and a
    sequence that is not a power of two) on this device."""
    worst = 0.0
    generator = torch.Generator(device=device).manual_seed(0)
    for sequence in (16, 13):
        q, k, v = (torch.randn(24, sequence, 5, 64, device=device, dtype=dtype, generator=generator)
                   for _ in range(3))
        reference = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
        got = short_attention(q, k, v).float()
        worst = max(worst, float((got - reference).norm() / reference.norm()))
    return worst


def install(unet: torch.nn.Module, kind: str, device: torch.device, dtype: torch.dtype) -> str:
    """Put ShortAttnProcessor on every attention of ``unet`` (any module holding diffusers Attentions) for ``kind`` "triton" (or "auto" where the kernel
    is available), after ``check`` on this device; returns the kind in use: "triton" or "sdpa".
    Raises ValueError for "triton" where the kernel cannot run."""
    if kind not in KINDS:
        raise ValueError(f"short attention {kind!r} is unknown; choose {' or '.join(KINDS)}")
    if kind == "sdpa" or (kind == "auto" and not available(device)):
        return "sdpa"
    if not available(device):
        raise ValueError(f"--short-attention triton needs a CUDA device and Triton; this engine runs on {device}"
                         + ("" if triton is not None else " and Triton is not installed"))
    error = check(device, dtype)
    if not error <= CHECK_TOLERANCE:
        log.warning(kv("short_attention_unusable", rel_err=f"{error:.2e}", tolerance=CHECK_TOLERANCE,
                       fix="kept scaled_dot_product_attention; report the GPU and the Triton version"))
        return "sdpa"
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    for attention in attentions:
        attention.set_processor(ShortAttnProcessor())
    log.info(kv("short_attention", kernel="triton", attentions=len(attentions), rel_err=f"{error:.2e}"))
    return "triton"
