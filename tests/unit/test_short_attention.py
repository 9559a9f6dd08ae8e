"""The short-sequence attention kernel (services/denoiser/short_attention.py): where it is used, where not.

On the CPU: the choice of kind and its errors, the processor's fallback (bit for bit AttnProcessor2_0), the
setting's one-line error. On a CUDA device (run on the lent GPU, skipped here): the kernel against float32
attention, the embedded UNet with it against without, under torch.compile and inside a CUDA graph."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import UNet3DConditionModel

from services.denoiser import short_attention as sa

MODEL = Path(__file__).resolve().parents[2] / "models" / "t2v-world"
CUDA = torch.cuda.is_available() and sa.triton is not None


def embedded_unet(device: str = "cpu", dtype: torch.dtype = torch.float32) -> UNet3DConditionModel:
    return UNet3DConditionModel.from_pretrained(MODEL / "unet", dtype=dtype).to(device).eval().requires_grad_(False)


def inputs(device: str, dtype: torch.dtype, rows: int = 2, frames: int = 16, seed: int = 0
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(seed)
    sample = torch.randn(rows, 4, frames, 8, 8, generator=g).to(device, dtype)
    timesteps = torch.tensor([500, 20] * (rows // 2), device=device)
    embeddings = torch.randn(rows, 77, 64, generator=g).to(device, dtype)
    return sample, timesteps, embeddings


def forward(unet: UNet3DConditionModel, x: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return unet(x[0], x[1], encoder_hidden_states=x[2], return_dict=False)[0]


def test_tile_sides_are_powers_of_two_of_at_least_16() -> None:
    assert [sa.padded(n) for n in (1, 8, 13, 16, 17, 32, 64, 65)] == [16, 16, 16, 16, 32, 32, 64, 128]


def test_auto_keeps_sdpa_where_the_kernel_cannot_run_and_triton_says_why() -> None:
    unet = embedded_unet()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    assert sa.install(unet, "auto", torch.device("cpu"), torch.float32) == "sdpa"
    assert sa.install(unet, "sdpa", torch.device("cpu"), torch.float32) == "sdpa"
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before
    with pytest.raises(ValueError, match="--short-attention triton needs a CUDA device, Triton and fp16 or bf16; "
                                         "this engine runs on cpu in float32"):
        sa.install(unet, "triton", torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="choose auto or triton or sdpa"):
        sa.install(unet, "flash", torch.device("cpu"), torch.float32)


def test_a_kernel_that_fails_its_check_stops_triton_and_leaves_auto_on_sdpa(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Where the kernel should run but does not build (a Triton error, an unsupported GPU) or computes other
    numbers: --short-attention triton stops the start with one line, auto keeps SDPA and says why; float32,
    which the kernel does not compute in, is SDPA for auto. (The device is made to look able: the policy,
    not the kernel, is tested here.)"""
    unet = embedded_unet()
    before = {name: type(p) for name, p in unet.attn_processors.items()}
    monkeypatch.setattr(sa, "available", lambda device: True)
    asked: list[set[int]] = []

    def broken(device: torch.device, dtype: torch.dtype, head_dims: Any = (64,)) -> float:
        asked.append(set(head_dims))
        raise RuntimeError("OutOfResources: shared memory")

    monkeypatch.setattr(sa, "check", broken)
    assert sa.install(unet, "auto", torch.device("cuda"), torch.float32) == "sdpa" and not asked
    with pytest.raises(ValueError, match=r"the kernel fails its check on cuda \(RuntimeError: OutOfResources"):
        sa.install(unet, "triton", torch.device("cuda"), torch.float16)
    assert asked == [{8}]                            # the embedded UNet's heads: 64 and 128 channels in 8 and 16
    with caplog.at_level("WARNING", logger="denoiser.short_attention"):
        assert sa.install(unet, "auto", torch.device("cuda"), torch.float16) == "sdpa"
    assert "short_attention_unusable" in caplog.text and "OutOfResources" in caplog.text
    monkeypatch.setattr(sa, "check", lambda device, dtype, head_dims=(64,): 0.5)     # other numbers
    with pytest.raises(ValueError, match="relative error 5.00e-01 > 0.02"):
        sa.install(unet, "triton", torch.device("cuda"), torch.float16)
    assert {name: type(p) for name, p in unet.attn_processors.items()} == before


def test_the_processor_is_attnprocessor2_0_bit_for_bit_where_the_kernel_does_not_apply() -> None:
    """On the CPU every attention falls back; the UNet's output is the default processor's exactly (a
    processor that took its own path, or changed the order of operations, would differ)."""
    unet = embedded_unet()
    x = inputs("cpu", torch.float32)
    expected = forward(unet, x)
    unet.set_attn_processor(sa.ShortAttnProcessor())
    assert {type(p) for p in unet.attn_processors.values()} == {sa.ShortAttnProcessor}
    assert torch.equal(forward(unet, x), expected)
    attention = unet.down_blocks[0].temp_attentions[0].transformer_blocks[0].attn1
    assert sa.head_dim(attention) == 8
    assert not sa.fits(torch.zeros(4, 16, 64), attention)              # the CPU
    assert not sa.fits(torch.zeros(4, 16, 64, 2), attention)           # not [batch, sequence, channels]


def test_on_fused_projections_the_fallback_is_diffusers_fused_processor_bit_for_bit() -> None:
    """With diffusers' fused q/k/v projections (``fuse_qkv_projections``: one matrix product where there
    were three), the processor's fallback is FusedAttnProcessor2_0's exactly, and the UNet is the unfused
    one up to float32 rounding. The fused weights are then scaled, so that a processor still reading
    to_q/to_k/to_v (the originals, kept) would give the unscaled output and fail."""
    from diffusers.models.attention_processor import FusedAttnProcessor2_0

    x = inputs("cpu", torch.float32)
    plain = forward(embedded_unet(), x)
    unet = embedded_unet()
    unet.fuse_qkv_projections()
    expected = forward(unet, x)
    for module in unet.modules():                                 # fused weights that are not the originals:
        if getattr(module, "fused_projections", False):           # only a processor reading them sees it
            with torch.no_grad():
                (module.to_qkv if hasattr(module, "to_qkv") else module.to_kv).weight.mul_(1.5)
    changed = forward(unet, x)
    unet.set_attn_processor(sa.ShortAttnProcessor())
    assert torch.equal(forward(unet, x), changed)
    assert not torch.allclose(changed, expected, atol=1e-3)
    unet.set_attn_processor(FusedAttnProcessor2_0())
    assert torch.equal(forward(unet, x), changed)
    assert torch.allclose(expected, plain, atol=1e-5, rtol=1e-4), float((expected - plain).abs().max())


def test_the_head_width_is_the_projections_not_the_inputs() -> None:
    from diffusers.models.attention_processor import Attention

    assert sa.head_dim(Attention(query_dim=64, heads=2, dim_head=160)) == 160        # 320 wide, not 64 / 2
    assert sa.head_dim(Attention(query_dim=64, heads=4, dim_head=16)) == 16


def test_the_setting_is_checked_at_start() -> None:
    from services.common.config import parse_config
    from services.denoiser.server import DenoiserConfig, check_compile

    config = parse_config(DenoiserConfig, [], "t2v serve denoiser", "d")
    assert config.short_attention == "auto"                  # timed on an H200: docs/benchmarks.md run F
    check_compile(config)
    with pytest.raises(ValueError, match="--short-attention 'flash' is unknown; choose auto or triton or sdpa"):
        check_compile(replace(config, short_attention="flash"))


def test_an_engine_reports_the_kind_it_uses() -> None:
    import json

    from services.denoiser import engine as eng

    config = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    engine = eng.DenoiseEngine(embedded_unet(), config, torch.device("cpu"), torch.float32, short_attention="auto")
    assert engine.short_attention == "sdpa"


# --- the kernel itself, on the CPU through Triton's interpreter ----------------------------------------

INTERPRETED_CHECK = r"""
import json, sys, torch
from diffusers import UNet3DConditionModel
from services.denoiser import short_attention as sa

assert sa.INTERPRETED, "TRITON_INTERPRET=1 was not seen"
report = {"kernel": []}
for batch, sequence, heads, dim in [(6, 16, 5, 64), (5, 13, 8, 8), (3, 1, 2, 16), (2, 24, 2, 128), (4, 32, 3, 40)]:
    g = torch.Generator().manual_seed(batch * 100 + sequence)
    qkv = torch.randn(batch, sequence, 3 * heads * dim, generator=g).half()
    q, k, v = (t.view(batch, sequence, heads, dim) for t in qkv.chunk(3, dim=-1))
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    got = sa.short_attention(q, k, v)
    report["kernel"].append({"shape": [batch, sequence, heads, dim], "same_shape": list(got.shape) == list(q.shape),
                             "contiguous": got.is_contiguous(), "dtype": str(got.dtype),
                             "rel_err": float((got.float() - reference).norm() / reference.norm())})
report["check"] = sa.check(torch.device("cpu"), torch.float16, (64, 8))
strided = torch.randn(4, 16, 64, 2).half().transpose(2, 3)            # [4, 16, 2, 64], its last stride 2
try:
    sa.short_attention(strided, strided, strided)
    report["strided"] = "computed"
except RuntimeError as refused:
    report["strided"] = str(refused)
model = sys.argv[1]
exact = UNet3DConditionModel.from_pretrained(model, dtype=torch.float32).eval().down_blocks[0]
block = UNet3DConditionModel.from_pretrained(model, dtype=torch.float16).eval().down_blocks[0]
g = torch.Generator().manual_seed(0)
frames_16 = torch.randn(16, 64, 2, 2, generator=g)          # one video: 16 frames of 2x2 at 64 channels
frames_2 = torch.randn(2, 64, 4, 4, generator=g)            # 2 frames of 4x4: 16 tokens a frame
words = torch.randn(2, 77, 64, generator=g)


def layers(temporal, spatial, cast):                        # the temporal attention, and a spatial transformer
    return (temporal(cast(frames_16), num_frames=16, return_dict=False)[0].float(),
            spatial(cast(frames_2), encoder_hidden_states=cast(words), return_dict=False)[0].float())


with torch.inference_mode():
    reference = layers(exact.temp_attentions[0], exact.attentions[0], lambda x: x)
    sdpa = layers(block.temp_attentions[0], block.attentions[0], torch.Tensor.half)
    report["installed"] = sa.install(block, "triton", torch.device("cpu"), torch.float16)
    calls = []
    kernel = sa.short_attention
    sa.short_attention = lambda q, k, v: calls.append(tuple(q.shape)) or kernel(q, k, v)
    triton = layers(block.temp_attentions[0], block.attentions[0], torch.Tensor.half)
report["kernel_calls"] = sorted(set(calls))
for module in block.modules():                              # one q/k/v matrix product (fuse_qkv_projections)
    if isinstance(module, sa.Attention):
        module.fuse_projections()
calls.clear()
with torch.inference_mode():
    fused = layers(block.temp_attentions[0], block.attentions[0], torch.Tensor.half)
report["fused_kernel_calls"] = sorted(set(calls))
report["fused_err"] = [float((a - r).norm() / r.norm()) for a, r in zip(fused, reference)]
report["sdpa_err"] = [float((a - r).norm() / r.norm()) for a, r in zip(sdpa, reference)]
report["triton_err"] = [float((a - r).norm() / r.norm()) for a, r in zip(triton, reference)]
print(json.dumps(report))
"""


@pytest.mark.skipif(CUDA, reason="on a GPU the CUDA cases below run the kernel itself; there (torch 2.11) "
                                   "torch.library.wrap_triton refused the interpreter's functions")
def test_the_kernel_under_tritons_interpreter_is_attention_and_the_unet_with_it_is_as_close_as_sdpa() -> None:
    """The kernel's own code (masks for sequences and head widths that are not powers of two, strided q/k/v,
    the float32 softmax) run on the CPU by Triton's interpreter, in fp16 (the interpreter's bf16 matrix
    product is wrong: 2.6e10 off on a 16x16 one, a kernel of three lines; the GPU test covers bf16). Then the
    embedded UNet's temporal attention and a spatial transformer with the processor (their short
    self-attentions through the kernel, the cross-attention through SDPA), against float32: the whole UNet
    under the interpreter takes 28 s, the GPU test runs it."""
    pytest.importorskip("triton")
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TRITON_INTERPRET": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", INTERPRETED_CHECK, str(MODEL / "unet")], env=env,
                          capture_output=True, text=True, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for row in report["kernel"]:
        assert row["same_shape"] and row["contiguous"] and row["dtype"] == "torch.float16", row
        assert row["rel_err"] < 1e-3, row                          # fp16 rounding: SDPA in fp16 is ~3e-4
    assert report["check"] < sa.CHECK_TOLERANCE / 10
    assert "contiguous in their last dimension" in report["strided"], report["strided"]   # never wrong numbers
    assert report["installed"] == "triton"
    assert report["kernel_calls"] == [[2, 16, 8, 8], [4, 16, 8, 8]], report       # spatial self, temporal (x2)
    for triton_err, sdpa_err in zip(report["triton_err"], report["sdpa_err"]):
        assert triton_err <= 1.5 * sdpa_err + 1e-4, report
    assert report["fused_kernel_calls"] == report["kernel_calls"], report          # fused: the kernel still runs
    for fused_err, sdpa_err in zip(report["fused_err"], report["sdpa_err"]):
        assert fused_err <= 1.5 * sdpa_err + 1e-4, report


# --- on a CUDA device ------------------------------------------------------------------------------

@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and Triton")
@pytest.mark.parametrize("batch,sequence,heads,dim", [(4096, 16, 5, 64), (300, 13, 8, 64), (64, 32, 20, 64),
                                                      (512, 16, 8, 8), (128, 1, 4, 16), (64, 24, 2, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_the_kernel_is_attention(batch: int, sequence: int, heads: int, dim: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device="cuda").manual_seed(batch + sequence)
    qkv = torch.randn(batch, sequence, 3 * heads * dim, device="cuda", dtype=dtype, generator=g)
    q, k, v = (t.view(batch, sequence, heads, dim) for t in qkv.chunk(3, dim=-1))     # strided, as in a fused qkv
    reference = torch.nn.functional.scaled_dot_product_attention(
        *(t.float().transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    sdpa = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2)
    got = sa.short_attention(q, k, v)
    assert got.shape == q.shape and got.dtype == dtype and got.is_contiguous()
    error = float((got.float() - reference).norm() / reference.norm())
    sdpa_error = float((sdpa.float() - reference).norm() / reference.norm())
    assert error <= max(2 * sdpa_error, 1e-3), (error, sdpa_error)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and Triton")
def test_the_unet_with_the_kernel_eager_compiled_and_graphed() -> None:
    """The embedded UNet in fp16 with the kernel (its temporal attention, 16 frames, and its 4x4 spatial
    self-attention) against without: as close as SDPA in fp16 is to float32; compiled and captured, the same."""
    unet = embedded_unet("cuda", torch.float16)
    x = inputs("cuda", torch.float16, rows=4)
    exact = forward(embedded_unet("cuda", torch.float32), tuple(t.float() if t.is_floating_point() else t for t in x))
    sdpa = forward(unet, x).float()
    assert sa.install(unet, "triton", torch.device("cuda"), torch.float16) == "triton"
    with torch.inference_mode():
        eager = forward(unet, x).float()
        compiled_unet = torch.compile(unet, dynamic=False, fullgraph=True)
        compiled = forward(compiled_unet, x).float()
        static = tuple(t.clone() for t in x)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            forward(compiled_unet, static)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = forward(compiled_unet, static)
        graph.replay()
        graphed = out.float().clone()

    def err(a: torch.Tensor) -> float:
        return float((a - exact).norm() / exact.norm())

    assert err(eager) <= 2 * err(sdpa) + 1e-3, (err(eager), err(sdpa))
    assert err(compiled) <= 2 * err(sdpa) + 1e-3 and torch.equal(graphed, compiled), (err(compiled), err(sdpa))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device and Triton")
def test_the_unet_with_fused_projections_and_the_kernel_compiled_is_the_same_unet() -> None:
    """bench/probe_unet.py's ``qkv`` lever as the product would run it: fused q/k/v projections, the kernel,
    compiled, in fp16, as close to float32 as the unfused UNet with SDPA."""
    x = inputs("cuda", torch.float16, rows=4)
    exact = forward(embedded_unet("cuda", torch.float32), tuple(t.float() if t.is_floating_point() else t for t in x))
    sdpa = forward(embedded_unet("cuda", torch.float16), x).float()
    unet = embedded_unet("cuda", torch.float16)
    unet.fuse_qkv_projections()
    assert sa.install(unet, "triton", torch.device("cuda"), torch.float16) == "triton"
    with torch.inference_mode():
        compiled = forward(torch.compile(unet, dynamic=False, fullgraph=True), x).float()

    def err(a: torch.Tensor) -> float:
        return float((a - exact).norm() / exact.norm())

    assert err(compiled) <= 2 * err(sdpa) + 1e-3, (err(compiled), err(sdpa))
