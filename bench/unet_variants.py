"""Time one UNet3D forward (the full 1.7B UNet, fp16) in several variants and batch sizes, and show
where the time goes. Used to choose what the denoiser engine does (results in docs/benchmarks.md).

    python bench/unet_variants.py --model /tmp/t2v-full --out /tmp/variants
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from diffusers import UNet3DConditionModel

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.probe_unet import event_median  # noqa: E402


def event_time(fn, repeat: int = 5) -> float:
    return event_median(fn, repeat=repeat)


def inputs(rows: int, dim: int, frames: int, size: int, factor: int = 8):
    """Random UNet inputs for ``rows`` rows of a size x size video; ``factor``: the VAE scale factor."""
    sample = torch.randn(rows, 4, frames, size // factor, size // factor, device="cuda", dtype=torch.float16)
    t = torch.full((rows,), 500, device="cuda", dtype=torch.long)
    emb = torch.randn(rows, 77, dim, device="cuda", dtype=torch.float16)
    return sample, t, emb


def main() -> None:
    from services.common.model_folder import vae_scale_factor
    from services.denoiser.graphs import GraphedUNet

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="/tmp/t2v-full")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rows", default="2,8,32,64")
    parser.add_argument("--compile-rows", default="2,32")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    rows_list = [int(r) for r in a.rows.split(",")]
    unet = UNet3DConditionModel.from_pretrained(f"{a.model}/unet", dtype=torch.float16).to("cuda").eval()
    dim = unet.config.cross_attention_dim
    factor = vae_scale_factor(a.model)
    results: dict = {}

    with torch.inference_mode():
        for rows in rows_list:
            s, t, e = inputs(rows, dim, a.frames, a.size, factor)
            results.setdefault("eager", {})[rows] = event_time(lambda: unet(s, t, encoder_hidden_states=e))
        graphed = GraphedUNet(lambda x, t, e: unet(x, t, encoder_hidden_states=e, return_dict=False)[0],
                              max_rows=max(rows_list), device=torch.device("cuda"))
        for rows in rows_list:
            s, t, e = inputs(rows, dim, a.frames, a.size, factor)
            results.setdefault("cuda_graphs", {})[rows] = event_time(lambda: graphed(s, t, e))
        print(json.dumps(results), flush=True)

        from torch.profiler import ProfilerActivity, profile
        s, t, e = inputs(32, dim, a.frames, a.size, factor)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            unet(s, t, encoder_hidden_states=e)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25)
        (a.out / "profile_rows32.txt").write_text(table)
        print(table[:6000], flush=True)

    compiled = torch.compile(unet, dynamic=False)
    for rows in [int(r) for r in a.compile_rows.split(",")]:
        s, t, e = inputs(rows, dim, a.frames, a.size, factor)
        start = time.perf_counter()
        with torch.inference_mode():
            compiled(s, t, encoder_hidden_states=e)
            torch.cuda.synchronize()
            results.setdefault("compile_seconds", {})[rows] = time.perf_counter() - start
            results.setdefault("compiled", {})[rows] = event_time(lambda: compiled(s, t, encoder_hidden_states=e))
        print(json.dumps(results), flush=True)
    (a.out / "variants.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
