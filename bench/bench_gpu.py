"""The mesh against diffusers' TextToVideoSDPipeline on one GPU, in ONE run, as ratios.

Builds the full text-to-video-ms-1.7b architecture with random weights (the real FLOPs), then:
  1. ceilings: a bf16 8192^3 matmul; the UNet's FLOPs per CFG step (torch's FlopCounterMode)
  2. the peer: TextToVideoSDPipeline in fp16, one video at a time (median of 3)
  3. the compute floor: text encoder + denoise engine + VAE in this process, no gRPC, no MP4
  4. the mesh: `t2v up` (four processes, gRPC over loopback), driven through the gateway:
     latency at concurrency 1, throughput at concurrency 4, 16, 32
Writes results.json and results.md to --out. `--quick` runs the same on the CPU with the embedded
model and tiny sizes (a smoke test of the script, not a measurement).

    python bench/bench_gpu.py --out /tmp/bench            # on a GPU host
    python bench/bench_gpu.py --quick --out /tmp/bench    # anywhere, in a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.config import DEFAULT_MODEL  # noqa: E402
from t2v.up import health_status  # noqa: E402
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2  # noqa: E402

PROMPT = "a red panda eating bamboo in a snowy forest"


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def matmul_ceiling(device: torch.device) -> float | None:
    """bf16 8192^3 matmul TFLOP/s (median of 10 after 3 warm-ups), random data."""
    if device.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(10):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * 8192**3 / statistics.median(times) / 1e12


def unet_flops_per_cfg_step(model: str, device, dtype, frames: int, size: int) -> float:
    from diffusers import UNet3DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    unet = UNet3DConditionModel.from_pretrained(f"{model}/unet", dtype=dtype).to(device).eval()
    sample = torch.randn(2, 4, frames, size // 8, size // 8, device=device, dtype=dtype)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([500, 500], device=device), encoder_hidden_states=emb)
    flops = counter.get_total_flops()
    del unet
    return float(flops)


def bench_peer(model: str, device, dtype, a) -> dict:
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_frames=a.frames, height=a.size, width=a.size, guidance_scale=9.0, output_type="np")
    pipe(PROMPT, num_inference_steps=2, **kwargs)  # warm-up
    lat = [timed(lambda i=i: pipe(PROMPT, num_inference_steps=a.steps,
                                  generator=torch.Generator().manual_seed(i), **kwargs), device) for i in range(3)]
    batch4 = timed(lambda: pipe([PROMPT] * 4, num_inference_steps=a.steps, **kwargs), device) if not a.quick else None
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"latency_s": statistics.median(lat), "latencies_s": lat, "four_in_one_call_s": batch4}


def bench_compute_floor(model: str, device, dtype, a) -> dict:
    """The GPU work of one video with nothing around it: encode, denoise (engine), decode."""
    from services.decoder.vae import VaeDecoder
    from services.denoiser import engine as eng
    from services.text_encoder.encoder import TextEncoder

    encoder = TextEncoder(model, device, dtype)
    engine = eng.DenoiseEngine.from_folder(model, device, dtype, max_batch=a.max_batch)
    if device.type == "cuda":
        engine.use_cuda_graphs()
    engine.warm([(a.frames, a.size, a.size)])
    engine.start()
    vae = VaeDecoder(model, device, dtype)

    def one(seed: int) -> None:
        emb = encoder.encode(["", PROMPT])
        job = engine.submit(eng.Request("floor", emb, a.frames, a.size, a.size, a.steps, 9.0, seed))
        while not isinstance(event := job.events.get(), eng.Finished):
            pass
        vae.decode(event.latents)

    one(0)
    parts = {"encode_s": timed(lambda: encoder.encode(["", PROMPT]), device)}
    lat = [timed(lambda i=i: one(i), device) for i in range(3)]
    engine.stop(1)
    del encoder, engine, vae
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"latency_s": statistics.median(lat), "latencies_s": lat, **parts}


def start_mesh(model: str, a, log_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "T2V_MAX_BATCH": str(a.max_batch), "T2V_MAX_JOBS": "256",
           "T2V_WARM_SHAPES": f"{a.frames}x{a.size}x{a.size}", "T2V_SLOTS": str(a.max_batch),
           "T2V_MAX_QUEUE": "1024", "T2V_STATE_DIR": "/tmp/t2v-bench-state", "T2V_COMPILE_ROWS": a.compile_rows}
    device = "cpu" if a.quick else "cuda"
    dtype = "float32" if a.quick else "float16"
    cmd = [sys.executable, "-m", "t2v", "up", "--model", model, "--device", device, "--dtype", dtype,
           "--base-port", str(a.base_port), "--log-dir", str(log_dir), "--start-timeout", "900"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    deadline = time.monotonic() + 900
    for port in range(a.base_port, a.base_port + 4):
        while health_status(f"127.0.0.1:{port}") != 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the mesh did not start; logs in {log_dir}")
            time.sleep(0.5)
    return proc


GPU_SECONDS = {  # metric _sum per stage that measures GPU work (CUDA events, or waiting for the kernels)
    1: "t2v_text_encoder_encode_duration_seconds_sum",
    2: "t2v_denoiser_step_duration_seconds_sum",    # whole steps: UNet forward, guidance, scheduler step
    3: "t2v_decoder_vae_decode_duration_seconds_sum",
}
STAGES = {1: "text_encoder", 2: "denoiser", 3: "decoder"}   # port offset -> the gateway's stage label


BREAKDOWN = {  # service port offset -> metric sums worth reporting per video
    0: ["t2v_gateway_stage_duration_seconds_sum", "t2v_gateway_queue_wait_seconds_sum"],
    1: ["t2v_text_encoder_encode_duration_seconds_sum"],
    2: ["t2v_denoiser_step_duration_seconds_sum"],
    3: ["t2v_decoder_vae_decode_duration_seconds_sum", "t2v_decoder_mp4_encode_duration_seconds_sum"],
}


def stage_minus_gpu(per_video: dict[str, float]) -> dict[str, float]:
    """Each stage as the gateway sees it (call, transfers, the service's CPU work) minus that stage's
    GPU-time metric, per video: where the non-GPU share sits (for the denoiser: admission, progress
    messages, the latents' hand-over, and any time the GPU idled between steps)."""
    result = {}
    for offset, stage in STAGES.items():
        wall = per_video.get(f't2v_gateway_stage_duration_seconds_sum{{stage="{stage}"}}')
        if wall is not None and GPU_SECONDS[offset] in per_video:
            result[stage] = wall - per_video[GPU_SECONDS[offset]]
    return result


def scrape(a) -> dict[str, float]:
    """Every metric sample named in BREAKDOWN, from each service's /metrics (gRPC port + 100)."""
    from urllib.request import urlopen

    samples: dict[str, float] = {}
    for offset, names in BREAKDOWN.items():
        text = urlopen(f"http://127.0.0.1:{a.base_port + offset + 100}/metrics", timeout=10).read().decode()
        for line in text.splitlines():
            if any(line.startswith(n) for n in names):
                key, value = line.rsplit(" ", 1)
                samples[key] = float(value)
    return samples


def gpu_seconds(a) -> float:
    """Sum of the stages' GPU-time metrics (each waits for its kernels)."""
    samples = scrape(a)
    return sum(v for k, v in samples.items() if any(k.startswith(n) for n in GPU_SECONDS.values()))


def generate(stub, a, seed: int, steps: int | None = None) -> float:
    params = generation_pb2.GenerationParams(prompt=PROMPT, num_frames=a.frames, height=a.size, width=a.size,
                                             num_inference_steps=steps or a.steps, seed=seed)
    start = time.perf_counter()
    result = None
    for event in stub.Generate(gateway_pb2.GenerateRequest(params=params), timeout=1800):
        if event.HasField("result"):
            result = event.result
    assert result is not None and result.video, "no video came back"
    return time.perf_counter() - start


def bench_mesh(model: str, a, out: Path) -> dict:
    proc = start_mesh(model, a, out / "logs")
    channel = grpc.insecure_channel(f"127.0.0.1:{a.base_port}",
                                    options=[("grpc.max_receive_message_length", 256 << 20)])
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        generate(stub, a, 999_999, steps=2)   # warm-up; a seed no measured request uses (no cache hit)
        gpu_before, before = gpu_seconds(a), scrape(a)
        lat = [generate(stub, a, i) for i in range(3)]
        gpu, after = gpu_seconds(a) - gpu_before, scrape(a)
        per_video = {k: (after[k] - before.get(k, 0.0)) / len(lat) for k in after}
        results: dict = {"latency_s": statistics.median(lat), "latencies_s": lat, "throughput": {},
                         "gpu_s_per_video": gpu / len(lat), "non_gpu_share": 1 - gpu / sum(lat),
                         "per_video_breakdown_s": per_video, "stage_minus_gpu_s": stage_minus_gpu(per_video)}
        for concurrency in a.concurrency:
            latencies: list[float] = []
            # Seeds unique across rounds: a repeated seed+params would be served from the result cache.
            threads = [threading.Thread(target=lambda i=i: latencies.append(generate(stub, a, 1000 * concurrency + i)))
                       for i in range(concurrency)]
            start = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
            assert len(latencies) == concurrency, "some requests failed"
            results["throughput"][concurrency] = {"wall_s": wall, "videos_per_s": concurrency / wall,
                                                  "mean_latency_s": statistics.mean(latencies)}
            log(f"mesh concurrency {concurrency}: {concurrency / wall:.3f} videos/s, wall {wall:.1f} s")
        return results
    finally:
        channel.close()
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default="/tmp/t2v-full", help="folder for the full-size random model")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--concurrency", default="4,16,32")
    parser.add_argument("--base-port", type=int, default=52050)
    parser.add_argument("--skip-peer", action="store_true")
    parser.add_argument("--skip-floor", action="store_true", help="skip the in-process compute floor")
    parser.add_argument("--compile-rows", default="", help="denoiser batch sizes (rows) to torch.compile, e.g. 32")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test of this script")
    a = parser.parse_args()
    a.concurrency = [int(c) for c in a.concurrency.split(",")]
    a.out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.model, a.steps, a.frames, a.size, a.max_batch, a.concurrency = DEFAULT_MODEL, 2, 4, 64, 4, [2]
    device = torch.device("cpu" if a.quick else "cuda")
    dtype = torch.float32 if a.quick else torch.float16
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "steps": a.steps, "frames": a.frames, "size": a.size}
    import diffusers
    report["diffusers"] = diffusers.__version__

    if not a.quick and not Path(a.model, "model_index.json").exists():
        from t2v.modelgen import make_model
        log("building the full-size model with random weights")
        report["make_model_s"] = timed(lambda: make_model("full", Path(a.model), device="cuda", dtype="float16"),
                                       device)
    report["bf16_matmul_tflops"] = matmul_ceiling(device)
    report["unet_flops_per_cfg_step"] = unet_flops_per_cfg_step(a.model, device, dtype, a.frames, a.size)
    log("ceiling", report["bf16_matmul_tflops"], "unet TFLOP/step", report["unet_flops_per_cfg_step"] / 1e12)
    def save() -> None:  # after every phase, so a run cut short still leaves its numbers
        (a.out / "results.json").write_text(json.dumps(report, indent=2))

    if not a.skip_peer:
        report["peer"] = bench_peer(a.model, device, dtype, a)
        log("peer", report["peer"])
        save()
    report["compile_rows"] = a.compile_rows
    if not a.skip_floor:
        report["floor"] = bench_compute_floor(a.model, device, dtype, a)
        log("floor", report["floor"])
        save()
    report["mesh"] = bench_mesh(a.model, a, a.out)
    log("mesh", report["mesh"])
    save()
    (a.out / "results.md").write_text(summarise(report))
    print(summarise(report))


def summarise(r: dict) -> str:
    mesh, floor = r["mesh"], r.get("floor")
    peer = r.get("peer", {}).get("latency_s")
    flops = r["unet_flops_per_cfg_step"]
    lines = [f"device {r['device']}, torch {r['torch']}, diffusers {r['diffusers']}, "
             f"{r['frames']}x{r['size']}x{r['size']}, {r['steps']} steps, "
             f"denoiser CUDA graphs" + (f", torch.compile for {r['compile_rows']} rows" if r.get('compile_rows') else ""),
             f"UNet {flops / 1e12:.2f} TFLOP per CFG step; bf16 matmul ceiling {r['bf16_matmul_tflops'] or 0:.0f} TFLOP/s",
             "| measure | value | ratio to peer |", "| --- | --- | --- |"]
    if peer:
        lines.append(f"| peer latency (one video) | {peer:.2f} s | 1.00 |")
    lines.append(f"| mesh latency, concurrency 1 | {mesh['latency_s']:.2f} s | "
                 f"{mesh['latency_s'] / peer if peer else float('nan'):.2f}x |")
    if floor:
        lines.append(f"| compute floor in one process (no gRPC, no MP4) | {floor['latency_s']:.2f} s | "
                     f"{floor['latency_s'] / peer if peer else float('nan'):.2f}x |")
    lines.append(f"| GPU time per video (stage metrics) | {mesh['gpu_s_per_video']:.2f} s | |")
    lines.append(f"| non-GPU share of mesh latency | {mesh['non_gpu_share']:.1%} | |")
    for stage, seconds in mesh.get("stage_minus_gpu_s", {}).items():
        lines.append(f"| {stage} stage (as the gateway sees it) minus its GPU time, per video | {seconds:.3f} s | |")
    for c, t in mesh["throughput"].items():
        speedup = t["videos_per_s"] * peer if peer else float("nan")
        mfu = (flops * r["steps"] * t["videos_per_s"] / 1e12) / (r["bf16_matmul_tflops"] or float("nan"))
        lines.append(f"| mesh throughput, concurrency {c} | {t['videos_per_s']:.3f} videos/s "
                     f"(UNet at {mfu:.0%} of the matmul ceiling) | {speedup:.2f}x |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
