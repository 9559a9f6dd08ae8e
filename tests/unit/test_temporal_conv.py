"""The temporal convolutions as 2-D ones (services/denoiser/temporal_conv.py): the same numbers as diffusers'
Conv3d, layer by layer and through the embedded UNet; the setting checked at start; the package key told."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import UNet3DConditionModel
from torch import nn

from services.denoiser import temporal_conv as tc
from services.denoiser.aot import module_state

MODEL = Path(__file__).resolve().parents[2] / "models" / "t2v-world"


def embedded_unet(device: str = "cpu", dtype: torch.dtype = torch.float32) -> UNet3DConditionModel:
    return UNet3DConditionModel.from_pretrained(MODEL / "unet", dtype=dtype).to(device).eval().requires_grad_(False)


def forward(unet: UNet3DConditionModel, rows: int = 2, seed: int = 0, device: str = "cpu",
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, 16, 8, 8, generator=g).to(device, dtype)
    embeddings = torch.randn(rows, 77, 64, generator=g).to(device, dtype)
    timesteps = torch.tensor([500, 20] * (rows // 2), device=device)
    with torch.inference_mode():
        return unet(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]


def test_only_convolutions_over_frames_alone_are_swapped() -> None:
    assert tc.swappable(nn.Conv3d(8, 4, (3, 1, 1), padding=(1, 0, 0)))
    assert tc.swappable(nn.Conv3d(8, 4, (5, 1, 1), padding=(2, 0, 0), bias=False))
    assert not tc.swappable(nn.Conv3d(8, 4, (3, 3, 3), padding=1))                   # mixes pixels
    assert not tc.swappable(nn.Conv3d(8, 4, (3, 1, 1), padding=(1, 1, 1)))           # pads pixels
    assert not tc.swappable(nn.Conv3d(8, 4, (3, 1, 1), stride=(2, 1, 1)))
    assert not tc.swappable(nn.Conv3d(8, 8, (3, 1, 1), groups=2))
    assert not tc.swappable(nn.Conv3d(8, 4, (3, 1, 1), padding=(1, 0, 0), padding_mode="reflect"))
    assert not tc.swappable(nn.Conv3d(8, 4, (3, 1, 1), padding="same"))
    assert not tc.swappable(nn.Conv2d(8, 4, 3))
    with pytest.raises(ValueError, match="only a \\(k, 1, 1\\) Conv3d"):
        tc.TemporalConv2d(nn.Conv3d(8, 4, 3))


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_a_swapped_convolution_computes_the_conv3ds_numbers(layout: str) -> None:
    """On the input a TemporalConvLayer gives it: [B*F, C, H, W] (either layout) seen as [B, C, F, H, W]."""
    torch.manual_seed(0)
    conv = nn.Conv3d(16, 24, (3, 1, 1), padding=(1, 0, 0))
    frames = torch.randn(2 * 16, 16, 5, 7)
    if layout == "channels_last":
        frames = frames.to(memory_format=torch.channels_last)
    x = frames[None].reshape(2, 16, 16, 5, 7).permute(0, 2, 1, 3, 4)
    swapped = tc.TemporalConv2d(conv)
    torch.testing.assert_close(swapped(x), conv(x), rtol=1e-5, atol=1e-5)
    assert swapped.weight.data_ptr() == conv.weight.data_ptr() and swapped.bias is conv.bias   # no copy


def test_the_embedded_unet_with_2d_temporal_convolutions_is_the_same_unet() -> None:
    exact, swapped = embedded_unet(), embedded_unet()
    before = module_state(swapped)
    conv3d = [m for m in swapped.modules() if isinstance(m, nn.Conv3d)]
    assert tc.install(swapped, "conv3d") == 0 and module_state(swapped) == before
    assert tc.install(swapped, "conv2d") == len(conv3d) > 0                  # every Conv3d of this UNet mixes frames
    assert not any(isinstance(m, nn.Conv3d) for m in swapped.modules())
    assert module_state(swapped) == [*before, f"layer=TemporalConv2d@{tc.CODE_VERSION}"]   # a new package key
    torch.testing.assert_close(forward(swapped, rows=4), forward(exact, rows=4), rtol=1e-4, atol=1e-5)
    for kind in ("fast", "auto"):                                       # auto is resolve's to settle
        with pytest.raises(ValueError, match="choose conv3d or conv2d"):
            tc.install(swapped, kind)


def test_auto_is_conv2d_on_a_cuda_device_with_compiled_buckets_and_conv3d_elsewhere() -> None:
    """Where it was timed to pay (docs/benchmarks.md run G): compiled buckets on a GPU; eager forwards and the
    CPU keep diffusers' layers."""
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert tc.resolve("auto", cuda, compiled=True) == "conv2d"
    assert tc.resolve("auto", cuda, compiled=False) == "conv3d"
    assert tc.resolve("auto", cpu, compiled=True) == "conv3d"
    assert tc.resolve("conv3d", cuda, compiled=True) == "conv3d"
    assert tc.resolve("conv2d", cpu, compiled=False) == "conv2d"
    with pytest.raises(ValueError, match="choose auto or conv3d or conv2d"):
        tc.resolve("conv1d", cpu, compiled=False)


def test_the_setting_is_checked_at_start_and_reaches_the_engine() -> None:
    import json

    from services.common.config import parse_config
    from services.denoiser import engine as eng
    from services.denoiser.server import DenoiserConfig, check_compile

    config = parse_config(DenoiserConfig, [], "t2v serve denoiser", "d")
    assert config.temporal_conv == "auto"
    with pytest.raises(ValueError, match="--temporal-conv 'conv1d' is unknown; choose auto or conv3d or conv2d"):
        check_compile(replace(config, temporal_conv="conv1d"))
    scheduler = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    engine = eng.DenoiseEngine(embedded_unet(), scheduler, torch.device("cpu"), torch.float32, temporal_conv="conv2d")
    assert engine.temporal_conv == "conv2d"
    assert any(isinstance(m, tc.TemporalConv2d) for m in engine.unet.modules())
    engine = eng.DenoiseEngine(embedded_unet(), scheduler, torch.device("cpu"), torch.float32)
    assert engine.temporal_conv == "conv3d"                     # the engine's own default: diffusers' layers
    assert not any(isinstance(m, tc.TemporalConv2d) for m in engine.unet.modules())
    with pytest.raises(ValueError, match="not one to install"):  # the server settles auto, not the engine
        eng.DenoiseEngine(embedded_unet(), scheduler, torch.device("cpu"), torch.float32, temporal_conv="auto")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_swapped_unet_compiled_on_a_gpu_is_the_same_unet() -> None:
    """fp16, compiled as the denoiser compiles its buckets: as close to the Conv3d UNet as two runs of it."""
    exact = forward(embedded_unet("cuda", torch.float32), rows=4, device="cuda").float()
    swapped = embedded_unet("cuda", torch.float16)
    tc.install(swapped, "conv2d")
    plain = forward(embedded_unet("cuda", torch.float16), rows=4, device="cuda", dtype=torch.float16).float()
    compiled = forward(torch.compile(swapped, dynamic=False, fullgraph=True), rows=4, device="cuda",
                       dtype=torch.float16).float()

    def err(a: torch.Tensor) -> float:
        return float((a - exact).norm() / exact.norm())

    assert err(compiled) <= 2 * err(plain) + 1e-3, (err(compiled), err(plain))
