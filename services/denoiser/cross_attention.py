"""The UNet3D's cross-attention computed once a video instead of once a frame.

Why: UNet3DConditionModel.forward repeats each prompt's embeddings once per frame
(``encoder_hidden_states.repeat_interleave(num_frames)``) and every spatial transformer's cross-attention then
projects the same 77 tokens to keys and values 16 times, and attends each frame's queries to its own copy.
Since a video's frames share one prompt, this processor projects a video's keys and values once and attends
the queries of all its frames to them in one call: softmax is taken per query, so joining the frames'
queries into one sequence gives each query the same keys and values (the same numbers up to the order in
which a kernel tiles the longer sequence: float32 rounding, tests/unit/test_cross_attention.py). It removes
15 of every 16 key/value projections (on the full 1.7B model at 16x256x256, ~2 of the 32-row forward's ~156
TFLOP) and their reads: -1.2% of a compiled 32-row forward on an H200 (docs/benchmarks.md run J).

How it learns the frame count: ``install`` registers a forward pre-hook on the UNet that passes
``cross_attention_kwargs={"frames": sample.shape[2]}`` (diffusers hands those to every attention processor
whose ``__call__`` takes them), so every caller of ``unet(...)`` (eager, torch.compile) gets it. Callers
that bypass ``__call__`` and its hooks pass it themselves: Dynamo's ahead-of-time compile traces the bound
``forward`` (aot.py asks ``call_kwargs``), and DeepCache's forwards call the UNet's blocks
(``attention_kwargs``).
Without a frame count (another caller), or for anything other than a plain cross-attention on a
[batch * frames, sequence, channels] input, the processor is the one it wraps, unchanged.

``--cross-attention video`` (the default) installs it; ``frame`` keeps diffusers' way.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

KINDS = ("video", "frame")
# The code's digest: in the precompiled packages' key (aot.module_state), so a graph traced with an older
# version of this file is rebuilt, never loaded.
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]
_MARK = "_t2v_cross_attention_hook"        # the UNet attribute holding the hook's handle, once installed


def plain_cross_attention(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                          attention_mask: torch.Tensor | None, frames: int | None) -> bool:
    """Whether this call is one the per-video path computes as diffusers' AttnProcessor2_0 does: a
    cross-attention on [batch * frames, sequence, channels] queries and as many rows of context, with no
    mask and none of the norms or projections the UNet3D does not use. That a video's rows of context are
    copies is the UNet3D's contract (its forward repeats them), not checked here: a caller that passes
    ``frames`` with per-frame context gets the first frame's for all."""
    return (frames is not None and frames > 1 and encoder_hidden_states is not None and attention_mask is None
            and hidden_states.ndim == 3 and encoder_hidden_states.ndim == 3
            and hidden_states.shape[0] == encoder_hidden_states.shape[0] and hidden_states.shape[0] % frames == 0
            and attn.spatial_norm is None and attn.group_norm is None and attn.norm_q is None
            and attn.norm_k is None and not getattr(attn, "fused_projections", False))


class VideoCrossAttnProcessor:
    """Runs a plain cross-attention (``plain_cross_attention``) once a video; anything else goes to
    ``inner``, the processor the attention had (AttnProcessor2_0, or short_attention's)."""

    VERSION = CODE_VERSION

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                 frames: int | None = None) -> torch.Tensor:
        if not plain_cross_attention(attn, hidden_states, encoder_hidden_states, attention_mask, frames):
            return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        assert encoder_hidden_states is not None and frames is not None      # plain_cross_attention checked
        residual = hidden_states
        rows, sequence, _ = hidden_states.shape
        videos = rows // frames
        context = encoder_hidden_states[::frames]           # a video's rows are copies (repeat_interleave)
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        heads = attn.heads
        width = key.shape[-1] // heads
        query = query.view(videos, frames * sequence, heads, width).transpose(1, 2)
        key = key.view(videos, -1, heads, width).transpose(1, 2)
        value = value.view(videos, -1, heads, width).transpose(1, 2)
        out = torch.nn.functional.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False)
        out = out.transpose(1, 2).reshape(rows, sequence, heads * width).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def attention_kwargs(unet: torch.nn.Module, frames: int) -> dict[str, int] | None:
    """The ``cross_attention_kwargs`` a caller of ``unet``'s blocks passes for ``frames`` frames: the frame
    count where ``install`` put the per-video processor on, None (diffusers' default) elsewhere."""
    return {"frames": int(frames)} if hasattr(unet, _MARK) else None


def call_kwargs(unet: torch.nn.Module, sample: torch.Tensor) -> dict[str, Any]:
    """The keyword arguments a caller of ``unet.forward`` that skips its hooks adds for this ``sample``
    [batch, channels, frames, height, width]: the frame count where ``install`` put the per-video processor
    on, nothing elsewhere (a module whose forward may not take ``cross_attention_kwargs``)."""
    extra = attention_kwargs(unet, sample.shape[2])
    return {"cross_attention_kwargs": extra} if extra else {}


def _pass_frames(unet: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
    sample = args[0] if args else kwargs["sample"]
    extra = dict(kwargs.get("cross_attention_kwargs") or {})
    extra.setdefault("frames", int(sample.shape[2]))
    return args, {**kwargs, "cross_attention_kwargs": extra}


def install(unet: torch.nn.Module, kind: str) -> int:
    """For ``kind`` "video", wrap every attention processor of ``unet`` (a UNet3DConditionModel) in a
    VideoCrossAttnProcessor and make the UNet's forward pass the frame count to them; returns how many of
    its attentions are cross-attentions (0 for "frame", and for a module without any: then nothing is
    installed). The last processor swap (after short attention's): a processor set after it would be handed
    ``frames``, which diffusers' own do not take (it warns at every call). Once is enough, a second call
    changes nothing, and "frame" installs nothing but never removes what "video" did (the engine installs
    on a UNet it just loaded). ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"cross attention {kind!r} is unknown; choose {' or '.join(KINDS)}")
    attentions = [m for m in unet.modules() if isinstance(m, Attention)]
    cross = sum(1 for a in attentions if a.is_cross_attention)
    if kind == "frame" or not cross:                  # nothing to share (a UNet without cross-attention)
        return 0
    for attention in attentions:
        if not isinstance(attention.processor, VideoCrossAttnProcessor):
            attention.set_processor(VideoCrossAttnProcessor(attention.processor or AttnProcessor2_0()))
    if not hasattr(unet, _MARK):
        object.__setattr__(unet, _MARK, unet.register_forward_pre_hook(_pass_frames, with_kwargs=True))
    return cross
