"""The UNet3D's temporal convolutions (``Conv3d``, kernel (k, 1, 1)) as 2-D convolutions over (frames, pixels).

Why: Inductor's channels-last layout pass lays out 2-D convolutions only (torch/_inductor/kernel/conv.py:
``V.graph.layout_opt and ndim == 2``), so the temporal convolutions' 5-D inputs stay channels-first, and
cuDNN, whose Hopper kernels are NHWC, transposes each one in and out: 28 ms of a 416 ms compiled 32-row
forward on an H200 (``nchwToNhwcKernel`` and ``nhwcToNchwKernel``, docs/benchmarks.md run F), for 4 of the
diffusers ``TemporalConvLayer``'s convolutions after every ResNet. A (k, 1, 1) kernel over [B, C, F, H, W]
is a (k, 1) kernel over [B, C, F, H*W]: the same products summed over the same inputs, each pixel on its
own, so the 2-D form computes the same numbers (to the order of a sum) and Inductor can lay it out as the
spatial convolutions around it. Merging H and W is a view for the layouts a TemporalConvLayer sees (its
input is a permuted [B*F, C, H, W], channels-first or channels-last).

``install(unet, "conv2d")`` swaps them; "conv3d" leaves diffusers'. The denoiser's default, "auto", is conv2d
where it was timed to pay: on a CUDA device with compiled buckets (the compiled 32-row forward 422.1 -> 409.3
ms on an H200, the mesh's 413.8 -> 398.2 ms: docs/benchmarks.md run G); conv3d elsewhere. Eager forwards
(no Inductor layout pass, so nothing for the swap to remove) and the CPU were not timed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

KINDS = ("auto", "conv3d", "conv2d")
# The code's digest: in a precompiled package's key (aot.module_state), so a graph traced with an older
# version of this file is rebuilt, never loaded.
CODE_VERSION = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def swappable(conv: nn.Module) -> bool:
    """A Conv3d that mixes frames only: kernel (k, 1, 1), stride 1, no dilation, one group, zero padding
    over frames alone."""
    return (isinstance(conv, nn.Conv3d) and conv.kernel_size[1:] == (1, 1) and conv.stride == (1, 1, 1)
            and conv.dilation == (1, 1, 1) and conv.groups == 1 and conv.padding_mode == "zeros"
            and isinstance(conv.padding, tuple) and conv.padding[1:] == (0, 0))


class TemporalConv2d(nn.Module):
    """``conv`` (see ``swappable``) as a 2-D convolution over [B, C, F, H*W]; its weight and bias, shared."""

    VERSION = CODE_VERSION

    def __init__(self, conv: nn.Conv3d) -> None:
        super().__init__()
        if not swappable(conv):
            raise ValueError(f"{conv} mixes more than frames; only a (k, 1, 1) Conv3d can be a TemporalConv2d")
        self.weight = nn.Parameter(conv.weight.detach().squeeze(-1), requires_grad=conv.weight.requires_grad)
        self.bias = conv.bias
        self.padding = (conv.padding[0], 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, channels, frames, height, width = x.shape
        y = nn.functional.conv2d(x.reshape(batch, channels, frames, height * width), self.weight, self.bias,
                                 padding=self.padding)
        return y.reshape(batch, y.shape[1], y.shape[2], height, width)


def resolve(kind: str, device: torch.device, compiled: bool) -> str:
    """The kind ``kind`` means on ``device`` for a UNet with (``compiled``) or without torch.compile'd
    buckets: "auto" is conv2d on a CUDA device with compiled buckets, conv3d otherwise (see the module's
    docstring); another kind is itself. ValueError for an unknown kind."""
    if kind not in KINDS:
        raise ValueError(f"temporal convolution {kind!r} is unknown; choose {' or '.join(KINDS)}")
    if kind == "auto":
        return "conv2d" if device.type == "cuda" and compiled else "conv3d"
    return kind


def install(unet: nn.Module, kind: str) -> int:
    """For ``kind`` "conv2d", every ``swappable`` Conv3d of ``unet`` becomes a TemporalConv2d; returns how
    many were swapped (0 for "conv3d"). ValueError for another kind ("auto" is ``resolve``'s to settle)."""
    if kind not in KINDS[1:]:
        raise ValueError(f"temporal convolution {kind!r} is not one to install; choose {' or '.join(KINDS[1:])}")
    if kind == "conv3d":
        return 0
    swaps = [(parent, name, child) for parent in unet.modules() for name, child in parent.named_children()
             if swappable(child)]
    for parent, name, child in swaps:
        setattr(parent, name, TemporalConv2d(child))
    return len(swaps)
