"""The cross-attention once a video (services/denoiser/cross_attention.py): the same numbers as diffusers'
once a frame, with a video's keys and values projected once; where it steps aside; the setting.

On the CPU: the embedded UNet with and without it, eager, through DeepCache's forwards and through an engine;
the package key; the setting's one-line error. On a CUDA device (run on the lent GPU, skipped here): with the
short-attention kernel, in fp16, compiled, as close to float32 as without."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import UNet3DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from services.denoiser import cross_attention as ca
from services.denoiser.aot import module_state
from tests.unit.test_short_attention import CUDA, MODEL, embedded_unet


def inputs(rows: int = 4, frames: int = 16, size: int = 8, seed: int = 0, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, 4, frames, size, size, generator=g).to(device, dtype)
    embeddings = torch.randn(rows, 77, 64, generator=g).to(device, dtype)   # every row its own prompt
    return sample, torch.tensor([500, 20] * (rows // 2), device=device), embeddings


def forward(unet: torch.nn.Module, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    with torch.inference_mode():
        return unet(x[0], x[1], encoder_hidden_states=x[2], return_dict=False)[0]


def context_rows(unet: UNet3DConditionModel) -> list[int]:
    """A list that fills, on each forward, with the rows of context the spatial cross-attentions project."""
    seen: list[int] = []
    for module in unet.modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            module.to_k.register_forward_hook(lambda mod, args, out: seen.append(args[0].shape[0]))
    return seen


@pytest.mark.parametrize("rows,frames,size", [(4, 16, 8), (2, 5, 4), (6, 1, 8)])
def test_once_a_video_is_the_same_unet_with_a_projection_a_video(rows: int, frames: int, size: int,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """The same numbers to float32 rounding on the CPU (each query sees the same keys and values; SDPA may tile
    the longer sequence of queries otherwise), with each cross-attention projecting one row of context a
    video instead of one a frame; one frame (nothing to share) goes diffusers' way."""
    x = inputs(rows, frames, size)
    exact, video = embedded_unet(), embedded_unet()
    before = context_rows(exact)
    expected = forward(exact, x)
    assert ca.install(video, "video") == len(before) > 0
    after = context_rows(video)
    torch.testing.assert_close(forward(video, x), expected, rtol=1e-5, atol=1e-5)
    assert set(before) == {rows * frames}
    assert set(after) == {rows if frames > 1 else rows * frames}
    assert "are not expected by" not in caplog.text        # every processor that is handed the count takes it


def test_frame_changes_nothing_a_second_install_nothing_more_and_the_package_key_names_both_processors() -> None:
    unet = embedded_unet()
    before = module_state(unet)
    assert ca.install(unet, "frame") == 0 and module_state(unet) == before
    cross = ca.install(unet, "video")
    processors = set(map(type, unet.attn_processors.values()))
    assert processors == {ca.VideoCrossAttnProcessor}
    assert before == ["training=False", "attn=AttnProcessor2_0"]
    assert module_state(unet) == [*before, f"attn=VideoCrossAttnProcessor@{ca.CODE_VERSION}"]   # a new key
    assert ca.install(unet, "video") == cross                 # no wrapper around a wrapper, no second hook
    assert all(type(p.inner) is AttnProcessor2_0 for p in unet.attn_processors.values())
    assert len(unet._forward_pre_hooks) == 1
    with pytest.raises(ValueError, match="cross attention 'once' is unknown; choose video or frame"):
        ca.install(unet, "once")
    other = torch.nn.Linear(4, 4)                         # no cross-attention (an engine's stand-in UNet)
    assert ca.install(other, "video") == 0 and not other._forward_pre_hooks and ca.attention_kwargs(other, 16) is None


def test_without_a_frame_count_or_with_a_mask_the_wrapped_processor_runs() -> None:
    """Blocks called directly (no frame count) and calls outside the UNet3D's plain case go to the processor
    it wraps, bit for bit."""
    unet = embedded_unet()
    ca.install(unet, "video")
    attention = next(m for m in unet.modules() if isinstance(m, Attention) and m.is_cross_attention)
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(8, 16, attention.query_dim, generator=g)
    context = torch.randn(8, 77, 64, generator=g)
    mask = torch.zeros(8, 1, 77)
    plain = AttnProcessor2_0()
    with torch.inference_mode():
        assert torch.equal(attention(hidden, context), plain(attention, hidden, context))
        assert torch.equal(attention(hidden, context, mask, frames=4), plain(attention, hidden, context, mask))
        assert torch.equal(attention(hidden, None, frames=4), plain(attention, hidden, None))
        assert torch.equal(attention(hidden, context, frames=3), plain(attention, hidden, context))   # 8 % 3


class TinyVideoUNet(torch.nn.Module):
    """A UNet3D in small for Dynamo's ahead-of-time compile (seconds, where the embedded UNet takes minutes
    on the CPU): rows a frame each, one diffusers cross-attention. Unlike the UNet3D it gives each frame its
    own context (the prompt plus the frame's index), against the per-video path's contract, so that the
    per-video and per-frame paths give other numbers and an output tells which path a package traced."""

    def __init__(self) -> None:
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.config = FrozenDict(_class_name="TinyVideoUNet", in_channels=4, cross_attention_dim=8, sample_size=4)
        torch.manual_seed(0)
        self.inp = torch.nn.Linear(4, 16)
        self.attn = Attention(query_dim=16, cross_attention_dim=8, heads=2, dim_head=8)
        self.out = torch.nn.Linear(16, 4)
        self.eval().requires_grad_(False)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                cross_attention_kwargs: dict | None = None, return_dict: bool = False) -> tuple[torch.Tensor]:
        batch, channels, frames, height, width = sample.shape
        x = sample.permute(0, 2, 3, 4, 1).reshape(batch * frames, height * width, channels)
        index = torch.arange(frames, dtype=sample.dtype, device=sample.device).repeat(batch)[:, None, None]
        context = encoder_hidden_states.repeat_interleave(frames, dim=0) + index
        x = self.attn(self.inp(x), context, **(cross_attention_kwargs or {}))
        y = self.out(x).reshape(batch, frames, height, width, channels).permute(0, 4, 1, 2, 3)
        return (y + timestep.float()[:, None, None, None, None] / 1e3,)


@pytest.mark.slow
def test_a_precompiled_package_is_traced_once_a_video(tmp_path: Path) -> None:
    """Dynamo's ahead-of-time compile traces the UNet's bound forward, which its hooks do not reach: the
    package must get the frame count from aot.py itself (it did not, at first: a review finding)."""
    from services.denoiser import aot

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 4, 3, 4, 4, generator=g), torch.tensor([10, 20]), torch.randn(2, 5, 8, generator=g))
    per_frame = forward(TinyVideoUNet(), x)
    model = TinyVideoUNet()
    assert ca.install(model, "video") == 1
    per_video = forward(model, x)
    assert not torch.allclose(per_video, per_frame, atol=1e-3)      # the probe tells the two paths apart
    path = tmp_path / "package"
    aot.save_precompiled(aot.precompile_forward(model, x), path)
    with torch.inference_mode():
        packaged = aot.load_precompiled(model, path)(*x)
    torch.testing.assert_close(packaged, per_video, rtol=1e-5, atol=1e-5)


def test_deepcaches_forwards_pass_the_frame_count_and_compute_what_the_unet_does() -> None:
    from services.denoiser.deepcache import DeepCacheUNet

    x = inputs(rows=2, frames=3, size=4)
    exact = forward(embedded_unet(), x)
    unet = embedded_unet()
    ca.install(unet, "video")
    seen = context_rows(unet)
    deep = DeepCacheUNet(unet, 0)
    with torch.inference_mode():
        noise, features = deep.full(*x)
        again = deep.shallow(*x, features)
    torch.testing.assert_close(noise, exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(again, noise)      # the same path as the UNet's own forward, bit for bit
    assert seen and set(seen) == {2}


def test_the_setting_is_checked_at_start_reaches_the_engine_and_its_batch_plan() -> None:
    from services.common.config import parse_config
    from services.denoiser import engine as eng
    from services.denoiser.server import DenoiserConfig, check_compile

    config = parse_config(DenoiserConfig, [], "t2v serve denoiser", "d")
    assert config.cross_attention == "video"
    with pytest.raises(ValueError, match="--cross-attention 'once' is unknown; choose video or frame"):
        check_compile(replace(config, cross_attention="once"))
    scheduler = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    engine = eng.DenoiseEngine(embedded_unet(), scheduler, torch.device("cpu"), torch.float32)
    assert engine.cross_attention == "video"
    assert set(map(type, engine.unet.attn_processors.values())) == {ca.VideoCrossAttnProcessor}
    frame = eng.DenoiseEngine(embedded_unet(), scheduler, torch.device("cpu"), torch.float32, cross_attention="frame")
    assert set(map(type, frame.unet.attn_processors.values())) == {AttnProcessor2_0}


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and Triton")
def test_with_the_kernel_in_fp16_compiled_it_is_as_close_to_float32_as_without() -> None:
    """As the product serves it on a GPU: the short-attention kernel wrapped, fp16, torch.compile'd whole."""
    from services.denoiser import short_attention as sa

    x = inputs(device="cuda", dtype=torch.float16)
    exact = forward(embedded_unet("cuda"), tuple(t.float() if t.is_floating_point() else t for t in x))
    frame = embedded_unet("cuda", torch.float16)
    sa.install(frame, "triton", torch.device("cuda"), torch.float16)
    video = embedded_unet("cuda", torch.float16)
    sa.install(video, "triton", torch.device("cuda"), torch.float16)
    ca.install(video, "video")
    assert {type(p.inner) for p in video.attn_processors.values()} == {sa.ShortAttnProcessor}
    seen = context_rows(video)
    per_frame = forward(torch.compile(frame, dynamic=False, fullgraph=True), x).float()
    per_video = forward(torch.compile(video, dynamic=False, fullgraph=True), x).float()

    def err(a: torch.Tensor) -> float:
        return float((a - exact).norm() / exact.norm())

    assert err(per_video) <= 2 * err(per_frame) + 1e-3, (err(per_video), err(per_frame))
    assert set(seen) == {4}                         # traced once a video (the hooks run while Dynamo traces)
