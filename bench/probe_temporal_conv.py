"""One ResNet-sized slice of the UNet3D, compiled, with diffusers' temporal convolutions and with their 2-D form.

Why: a quick look, in a few minutes of GPU time, at whether ``--temporal-conv conv2d``
(services/denoiser/temporal_conv.py) removes cuDNN's NCHW <-> NHWC transposes around the temporal
convolutions once Inductor lays them out channels-last, and what it does to their time, before the
whole UNet is compiled with it (bench/probe_unet.py ``--variants triton,triton+conv2d``). The slice is
a 3x3 convolution (so Inductor's layout pass sees a convolution graph), diffusers' TemporalConvLayer
(GroupNorm, SiLU and a (3, 1, 1) Conv3d, four times, 16 frames) and another 3x3 convolution, at the first
level of a 32-row batch of the 1.7B UNet: 512 frames of 320 x 32 x 32, fp16. Prints one JSON line a
variant and writes probe_temporal_conv.json.

    python bench/probe_temporal_conv.py --out /tmp/ptc
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench.probe_unet import event_median, kernel_families  # noqa: E402 - the probe's timing and kernel families


class Slice(nn.Module):
    def __init__(self, channels: int, frames: int) -> None:
        from diffusers.models.resnet import TemporalConvLayer

        super().__init__()
        self.frames = frames
        self.before = nn.Conv2d(channels, channels, 3, padding=1)
        self.temporal = TemporalConvLayer(channels, channels, norm_num_groups=32)
        self.after = nn.Conv2d(channels, channels, 3, padding=1)
        for conv in (self.temporal.conv4[-1],):                     # diffusers zeroes it: make it do work
            nn.init.normal_(conv.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.after(self.temporal(self.before(x), num_frames=self.frames))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", type=int, default=32)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    from services.denoiser import temporal_conv

    torch.manual_seed(0)
    frames, channels = 16, 320
    x = torch.randn(a.rows * frames, channels, 32, 32, device="cuda", dtype=torch.float16)
    report: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": a.rows}
    reference = None
    base = Slice(channels, frames).to("cuda", torch.float16).eval()
    with torch.inference_mode():
        for kind in ("conv3d", "conv2d"):
            model = copy.deepcopy(base)                      # the same weights: the error compares like with like
            swapped = temporal_conv.install(model, kind)
            torch._dynamo.reset()
            compiled = torch.compile(model, dynamic=False)
            started = time.perf_counter()
            out = compiled(x)
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - started
            ms = event_median(lambda: compiled(x), warmup=3) * 1e3
            if reference is None:
                reference = out.float()
            row = {"kind": kind, "swapped": swapped, "compile_s": round(compile_s, 1), "ms": round(ms, 3),
                   "rel_err_vs_conv3d": round(float((out.float() - reference).norm() / reference.norm()), 6),
                   "families_ms": kernel_families(lambda: compiled(x))["ms"]}
            report[kind] = row
            print(json.dumps(row), flush=True)
            (a.out / "probe_temporal_conv.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
