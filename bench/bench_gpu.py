"""The mesh against diffusers' TextToVideoSDPipeline on one GPU, in ONE run, as ratios.

Builds the full text-to-video-ms-1.7b architecture with random weights (the real FLOPs), then, as
--phases says (default peer,floor,mesh):
  0. the host: lscpu's CPU, nvidia-smi's GPU and driver
  1. ceilings: a bf16 8192^3 matmul; the UNet's FLOPs per CFG step (torch's FlopCounterMode)
  2. peer: TextToVideoSDPipeline in fp16, one video at a time (median and spread of --peer-runs)
     compiled-peer: the same with torch.compile(pipe.unet) (static shapes, as a diffusers user
     compiles): one video at a time, and --compiled-peer-batch prompts in one call
  3. floor: text encoder + denoise engine + VAE in this process, no gRPC, no MP4
  4. mesh: `t2v up` (four processes, gRPC over loopback), driven through the gateway: its start
     (with --cold-start on an empty compile cache, then --restarts on the warm one; --compile-rows
     through --compile-backend inductor, precompile or aoti), latency at concurrency 1, throughput at each
     --concurrency, the batch sizes the denoiser ran
  levers: one UNet forward as CUDA graphs, NCHW against channels-last, at a few batch sizes
Every phase and mesh round also records the host's CPUs (bench/host_load.py: busy and steal shares, one
core's speed before it; in each mesh round the CPU seconds of each service and of what it started): a lent
host's CPU moves the CPU-bound figures between calls.
Each phase and each mesh round is skipped if it would end past --budget-s (the device tool stops a
command at 10 minutes); what was skipped is written down. Writes results.json (after every phase),
results.md and logs.tgz (the services' logs) to --out. `--quick` runs the same on the CPU with the
embedded model and tiny sizes (a smoke test of the script, not a measurement).

    python bench/bench_gpu.py --out /tmp/bench            # on a GPU host
    python bench/bench_gpu.py --quick --out /tmp/bench    # anywhere, in a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import grpc
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.host_load import describe, watch  # noqa: E402
from services.common.config import DEFAULT_MODEL  # noqa: E402
from t2v.up import health_status  # noqa: E402
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2  # noqa: E402

PROMPT = "a red panda eating bamboo in a snowy forest"
STARTED = time.monotonic()
LOGS = Path("/tmp/t2v-bench-logs")


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), f"[{elapsed():.0f} s]", *parts, flush=True)


def elapsed() -> float:
    return time.monotonic() - STARTED


def fits(a, seconds: float, what: str, report: dict, reserve: float = 0.0) -> bool:
    """Whether ``seconds`` more (and ``reserve`` kept for later phases) still end inside --budget-s;
    if not, write down that ``what`` was skipped."""
    if elapsed() + seconds + reserve <= a.budget_s:
        return True
    report.setdefault("skipped", []).append(f"{what} (needs ~{seconds:.0f} s at {elapsed():.0f} s of {a.budget_s:.0f})")
    log("skipped", what)
    return False


def spread(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values),
            "stdev": statistics.stdev(values) if len(values) > 1 else 0.0, "runs": values}


def host_info() -> dict:
    """The host CPU (lscpu) and the GPU (nvidia-smi): the peer's time moves with the CPU."""
    info: dict = {"cpus": os.cpu_count()}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=20).stdout
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in {"Model name", "CPU(s)", "Thread(s) per core", "Core(s) per socket", "Socket(s)",
                               "CPU max MHz", "Hypervisor vendor", "L3"}:
                info[key.strip()] = value.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["lscpu"] = repr(exc)
    try:
        info["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,"
                                      "power.limit", "--format=csv,noheader"], capture_output=True, text=True,
                                     timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["gpu"] = repr(exc)
    return info


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

    from services.common.model_folder import vae_scale_factor

    unet = UNet3DConditionModel.from_pretrained(f"{model}/unet", dtype=dtype).to(device).eval()
    latent = size // vae_scale_factor(model)
    sample = torch.randn(2, 4, frames, latent, latent, device=device, dtype=dtype)
    emb = torch.randn(2, 77, unet.config.cross_attention_dim, device=device, dtype=dtype)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        unet(sample, torch.tensor([500, 500], device=device), encoder_hidden_states=emb)
    flops = counter.get_total_flops()
    del unet
    return float(flops)


def bench_peer(model: str, device, dtype, a, compiled: bool = False) -> dict:
    """diffusers' pipeline, eager or with torch.compile(pipe.unet, dynamic=False): one video at a time
    (--peer-runs), then a batch of prompts in one call (--peer-batch eager, --compiled-peer-batch
    compiled; 0 = skip). A compiled pipeline's first call at each batch size compiles (timed apart)."""
    from diffusers import TextToVideoSDPipeline

    pipe = TextToVideoSDPipeline.from_pretrained(model, dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    result: dict = {}
    if compiled:
        pipe.unet = torch.compile(pipe.unet, dynamic=False)
    kwargs = dict(num_frames=a.frames, height=a.size, width=a.size, guidance_scale=9.0, output_type="np")
    result["first_call_s"] = timed(lambda: pipe(PROMPT, num_inference_steps=2, **kwargs), device)  # warm-up/compile
    lat = [timed(lambda i=i: pipe(PROMPT, num_inference_steps=a.steps,
                                  generator=torch.Generator().manual_seed(i), **kwargs), device)
           for i in range(a.peer_runs)]
    result.update(latency_s=statistics.median(lat), latencies_s=lat, latency=spread(lat))
    batch = a.compiled_peer_batch if compiled else a.peer_batch
    if batch and not a.quick:
        result["batch"] = batch
        result["batch_first_call_s"] = timed(lambda: pipe([PROMPT] * batch, num_inference_steps=2, **kwargs), device)
        seconds = timed(lambda: pipe([PROMPT] * batch, num_inference_steps=a.steps, **kwargs), device)
        result.update(batch_call_s=seconds, batch_videos_per_s=batch / seconds, batch_s_per_video=seconds / batch)
    del pipe
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    if compiled:
        torch._dynamo.reset()
    return result


def channels_last(unet: torch.nn.Module) -> torch.nn.Module:
    """Every 4-D weight channels-last, every 5-D one channels-last-3d (Module.to refuses 5-D ones)."""
    for param in unet.parameters():
        if param.dim() == 4:
            param.data = param.data.contiguous(memory_format=torch.channels_last)
        elif param.dim() == 5:
            param.data = param.data.contiguous(memory_format=torch.channels_last_3d)
    return unet


def bench_levers(model: str, device, dtype, a) -> dict:
    """One UNet forward replayed as a CUDA graph (median of 3, random inputs), NCHW and channels-last."""
    from diffusers import UNet3DConditionModel
    from services.common.model_folder import vae_scale_factor
    from services.denoiser.graphs import GraphedUNet

    unet = UNet3DConditionModel.from_pretrained(f"{model}/unet", dtype=dtype).to(device).eval().requires_grad_(False)
    latent = a.size // vae_scale_factor(model)
    shape = (4, a.frames, latent, latent)
    rows = [int(r) for r in a.lever_rows.split(",")]
    result: dict = {}
    with torch.inference_mode():
        for name in ("nchw", "channels_last"):
            if name == "channels_last":
                channels_last(unet)
            graphed = GraphedUNet(lambda x, t, e: unet(x, t, encoder_hidden_states=e, return_dict=False)[0],
                                  device=device, buckets=rows)
            result[name] = {r: graphed.time(r, (shape, (), (77, unet.config.cross_attention_dim)),
                                            (dtype, torch.long, dtype)) * 1e3
                            for r in rows}
            log("lever", name, {r: f"{ms:.1f} ms" for r, ms in result[name].items()})
            del graphed
            torch.cuda.empty_cache()
    del unet
    gc.collect()
    torch.cuda.empty_cache()
    return {"forward_ms": result, "rows": rows}


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


def start_mesh(model: str, a, log_dir: Path, extra_env: dict[str, str] | None = None
               ) -> tuple[subprocess.Popen, float]:
    """`t2v up`, and the seconds until all four services answer SERVING."""
    started = time.monotonic()
    env = {**os.environ, **(extra_env or {}), "HF_HUB_OFFLINE": "1", "T2V_MAX_BATCH": str(a.max_batch), "T2V_MAX_JOBS": "256",
           "T2V_WARM_SHAPES": f"{a.frames}x{a.size}x{a.size}", "T2V_SLOTS": str(a.max_batch),
           "T2V_MAX_QUEUE": "1024", "T2V_STATE_DIR": "/tmp/t2v-bench-state", "T2V_COMPILE_ROWS": a.compile_rows,
           "T2V_COMPILE_CACHE": str(a.compile_cache), "T2V_COMPILE_BACKEND": a.compile_backend,
           # 64 clients stream at once: above the default cap of 48 streams (three quarters of 64 workers)
           "T2V_MAX_WORKERS": "160", "T2V_MAX_STREAMS": "128"}
    device = "cpu" if a.quick else "cuda"
    dtype = "float32" if a.quick else "float16"
    cmd = [sys.executable, "-m", "t2v", "up", "--model", model, "--device", device, "--dtype", dtype,
           "--base-port", str(a.base_port), "--log-dir", str(log_dir), "--start-timeout", "900"]
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, start_new_session=True)
    wait_serving(proc, a.base_port, log_dir, 900)
    return proc, time.monotonic() - started


def wait_serving(proc: subprocess.Popen, base_port: int, log_dir: Path, timeout: float, services: int = 4) -> None:
    """Until the ``services`` services of ``proc`` (the mesh's four) on the ports from ``base_port`` answer
    SERVING; SystemExit if it exits or ``timeout`` seconds pass first."""
    deadline = time.monotonic() + timeout
    for port in range(base_port, base_port + services):
        while health_status(f"127.0.0.1:{port}") != 1:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the mesh did not start; logs in {log_dir}")
            time.sleep(0.5)


def wait_for_deferred_captures(log_dir: Path, serving_s: float, timeout: float = 180.0) -> float | None:
    """After a warm start with --warm-later (the default), the denoiser captures its uncompiled buckets'
    graphs after SERVING while idle: wait (idle) until its log says they are done, so what is measured next
    is the steady state. Seconds from the launch to then (None: nothing was deferred, or no line in time)."""
    path = log_dir / "denoiser.log"
    warm = denoiser_events(log_dir).get("warm", {})
    if not int(warm.get("deferred", 0) or 0):
        return None
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if "event=warm_later_done" in path.read_text(errors="replace"):
            return round(serving_s + time.monotonic() - started, 1)
        time.sleep(0.5)
    log(f"the denoiser's deferred captures were not done {timeout:.0f} s after SERVING; measuring anyway")
    return None


def stop_mesh(proc: subprocess.Popen) -> None:
    """Ctrl-C to a process group started with ``start_new_session`` (`t2v up`, or one `t2v serve` stage) and wait:
    the services drain and stop as an operator's would."""
    os.killpg(proc.pid, signal.SIGINT)
    proc.wait(timeout=120)


BACKEND_WORDS = {"inductor": "torch.compile", "precompile": "precompiled packages (Dynamo's aot_compile)",
                 "aoti": "AOTInductor packages"}
KV = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def denoiser_events(log_dir: Path) -> dict:
    """The denoiser's start as its log says it: compile-cache status, load and warm-up seconds, the
    batch plan (each bucket's measured forward, the row cap), and with --compile-backend precompile or aoti
    each compiled bucket's package (loaded, built, rebuilt or fallen back to torch.compile, in how many seconds)."""
    found: dict = {}
    path = log_dir / "denoiser.log"
    if not path.exists():
        return found
    for line in path.read_text(errors="replace").splitlines():
        fields = {k: v.strip('"') for k, v in KV.findall(line)}
        if fields.get("event") in {"compile_cache", "warm", "batch_plan", "compile_times"}:
            found[fields["event"]] = {k: v for k, v in fields.items() if k != "event"}
        elif fields.get("event") in {"package_bucket", "package_fallback", "package_unusable"}:   # one per bucket
            found.setdefault("packages", []).append({k: v for k, v in fields.items() if k != "event"})
        elif fields.get("event") == "warm_later_done":      # the captures left for after SERVING (--warm-later)
            found["warm_later_done"] = {k: v for k, v in fields.items() if k != "event"}
        elif fields.get("event") == "config" and "config_ts" not in found:   # its imports are done by then
            found["config_ts"] = fields.get("ts")
    return found


GPU_SECONDS = {  # metric _sum per stage that measures GPU work (CUDA events, or waiting for the kernels)
    1: "t2v_text_encoder_encode_duration_seconds_sum",
    2: "t2v_denoiser_step_duration_seconds_sum",    # whole steps: UNet forward, guidance, scheduler step
    3: "t2v_decoder_vae_decode_duration_seconds_sum",
}
STAGES = {1: "text_encoder", 2: "denoiser", 3: "decoder"}   # port offset -> the gateway's stage label


BREAKDOWN = {  # service port offset -> metric sums worth reporting per video
    0: ["t2v_gateway_stage_duration_seconds_sum", "t2v_gateway_queue_wait_seconds_sum"],
    1: ["t2v_text_encoder_encode_duration_seconds_sum", "t2v_text_encoder_encode_duration_seconds_count"],
    2: ["t2v_denoiser_step_duration_seconds_sum", "t2v_denoiser_batch_size_sum", "t2v_denoiser_batch_size_count",
        "t2v_denoiser_batch_size_bucket"],
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


def metric_samples(port: int, names: tuple[str, ...] | list[str]) -> dict[str, float]:
    """The samples of the service's /metrics (on ``port``) whose line starts with one of ``names``."""
    from urllib.request import urlopen

    text = urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith(tuple(names)):
            key, value = line.rsplit(" ", 1)
            samples[key] = float(value)
    return samples


def scrape(a) -> dict[str, float]:
    """Every metric sample named in BREAKDOWN, from each service's /metrics (gRPC port + 100)."""
    samples: dict[str, float] = {}
    for offset, names in BREAKDOWN.items():
        samples.update(metric_samples(a.base_port + offset + 100, names))
    return samples


def gpu_seconds(a) -> float:
    """Sum of the stages' GPU-time metrics (each waits for its kernels)."""
    samples = scrape(a)
    return sum(v for k, v in samples.items() if any(k.startswith(n) for n in GPU_SECONDS.values()))


ARRIVALS = {"stage": lambda e: f"{gateway_pb2.Stage.Name(e.stage.stage).removeprefix('STAGE_').lower()}_started",
            "progress": lambda e: "first_step", "result": lambda e: "video"}


def generate(stub, a, seed: int, steps: int | None = None, cache: str = "",
             marks: dict[str, float] | None = None, since: float | None = None) -> float:
    """One video through the gateway's Generate; its seconds. ``marks`` gets, for each of ARRIVALS' events,
    the seconds from ``since`` (default: this call's start) to its first arrival at the client."""
    params = generation_pb2.GenerationParams(prompt=PROMPT, num_frames=a.frames, height=a.size, width=a.size,
                                             num_inference_steps=steps or a.steps, seed=seed, cache=cache)
    start = time.perf_counter()
    result = None
    for event in stub.Generate(gateway_pb2.GenerateRequest(params=params), timeout=1800):
        kind = event.WhichOneof("event")
        if marks is not None and kind in ARRIVALS:
            marks.setdefault(ARRIVALS[kind](event), time.perf_counter() - (start if since is None else since))
        if event.HasField("result"):
            result = event.result
    assert result is not None and result.video, "no video came back"
    return time.perf_counter() - start


def arrivals(marks: list[dict[str, float]]) -> dict[str, dict[str, float]]:
    """Per event, the first, median and last request's seconds since the burst began: when a burst's
    requests reached each stage, their first denoising step and their video."""
    seconds: dict[str, list[float]] = {}
    for request in marks:
        for name, at in request.items():
            seconds.setdefault(name, []).append(at)
    spread = {name: {"first": min(v), "median": statistics.median(v), "last": max(v)} for name, v in seconds.items()}
    return dict(sorted(spread.items(), key=lambda item: item[1]["median"]))


def batch_sizes(before: dict[str, float], after: dict[str, float]) -> dict:
    """The denoiser's forwards between two scrapes: how many, their mean batch (requests), and how many
    ran more than 16 requests (the t2v_denoiser_batch_size histogram)."""
    delta = {k: after[k] - before.get(k, 0.0) for k in after if k.startswith("t2v_denoiser_batch_size")}
    count = delta.get("t2v_denoiser_batch_size_count", 0.0)
    le16 = delta.get('t2v_denoiser_batch_size_bucket{le="16.0"}', 0.0)
    return {"forwards": count, "mean_batch": delta.get("t2v_denoiser_batch_size_sum", 0.0) / count if count else None,
            "forwards_over_16": count - le16}


def parse_env(entry: str) -> dict[str, str]:
    """'VAR=VALUE,VAR=VALUE' -> a dict of them (items without '=' left out)."""
    return dict(item.split("=", 1) for item in entry.split(",") if "=" in item)


def restart_env(a, attempt: int) -> dict[str, str]:
    """The extra environment of start ``attempt`` (0 = the first): --restart-env's entry for it."""
    entries = a.restart_env.split(";") if a.restart_env else []
    if attempt == 0 or attempt > len(entries):
        return {}
    return parse_env(entries[attempt - 1])


def mesh_rounds(stub, a, out: Path, report: dict, results: dict, target: dict, mode: str, mesh_pid: int) -> None:
    """Latency at concurrency 1 and throughput at each --concurrency, every request with ``cache=mode``; each
    round's host figures with the CPU seconds of the mesh's processes (``mesh_pid``: `t2v up`) by role."""
    seed0 = {"none": 0, "deep": 500_000}.get(mode, 900_000)    # seeds unique across modes and rounds
    gpu_before, before = gpu_seconds(a), scrape(a)
    with watch(root=mesh_pid) as cpu:
        lat = [generate(stub, a, seed0 + i, cache=mode) for i in range(a.latency_runs)]
    gpu, after = gpu_seconds(a) - gpu_before, scrape(a)
    per_video = {k: (after[k] - before.get(k, 0.0)) / len(lat) for k in after}
    target.update({"latency_s": statistics.median(lat), "latencies_s": lat, "latency": spread(lat),
                   "gpu_s_per_video": gpu / len(lat), "non_gpu_share": 1 - gpu / sum(lat),
                   "per_video_breakdown_s": per_video, "stage_minus_gpu_s": stage_minus_gpu(per_video),
                   "host_load": cpu})
    log(f"mesh latency (cache {mode})", target["latency"])
    rate = 1 / statistics.median(lat)     # videos/s known so far, to guess each round's length
    for concurrency in a.concurrency:
        if not fits(a, 1.2 * concurrency / rate + 5, f"mesh concurrency {concurrency} cache {mode}", report,
                    a.reserve_s):
            continue
        before = scrape(a)
        latencies: list[float] = []
        marks: list[dict[str, float]] = [{} for _ in range(concurrency)]
        with watch(root=mesh_pid) as cpu:
            start = time.perf_counter()
            threads = [threading.Thread(target=lambda i=i: latencies.append(generate(
                stub, a, seed0 + 1000 * concurrency + i, cache=mode, marks=marks[i], since=start)))
                for i in range(concurrency)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - start
        assert len(latencies) == concurrency, "some requests failed"
        after = scrape(a)
        # where a burst's first second goes (queue wait, each stage as the gateway sees it, the encoder's
        # own forwards): the same per-video breakdown as the latency runs', under load
        target["throughput"][concurrency] = {"wall_s": wall, "videos_per_s": concurrency / wall,
                                             "mean_latency_s": statistics.mean(latencies),
                                             "arrivals_s": arrivals(marks), "host_load": cpu,
                                             "per_video_breakdown_s": {k: (after[k] - before.get(k, 0.0)) / concurrency
                                                                       for k in after if "bucket" not in k},
                                             **batch_sizes(before, after)}
        rate = max(rate, concurrency / wall)
        log(f"mesh concurrency {concurrency} (cache {mode}): {concurrency / wall:.3f} videos/s, wall {wall:.1f} s",
            target["throughput"][concurrency])
        report["mesh"] = results
        (out / "results.json").write_text(json.dumps(report, indent=2))


def bench_mesh(model: str, a, out: Path, report: dict) -> dict:
    results: dict = {"starts": [], "throughput": {}}
    if a.cold_start:
        shutil.rmtree(a.compile_cache, ignore_errors=True)
    proc = None
    for attempt in range(1 + a.restarts):
        if proc is not None:
            stop_mesh(proc)
        log_dir = LOGS / f"start{len(list(LOGS.glob('start*')))}"
        extra = restart_env(a, attempt)
        launched = time.strftime("%Y-%m-%dT%H:%M:%S")
        proc, seconds = start_mesh(model, a, log_dir, extra)
        results["starts"].append({"seconds": seconds, "launched_ts": launched, "cache_was_empty": attempt == 0 and a.cold_start,
                                  "env": extra, **denoiser_events(log_dir)})
        results["starts"][-1]["all_captured_s"] = wait_for_deferred_captures(log_dir, seconds)
        log("mesh start", results["starts"][-1])
    assert proc is not None
    channel = grpc.insecure_channel(f"127.0.0.1:{a.base_port}",
                                    options=[("grpc.max_receive_message_length", 256 << 20)])
    stub = gateway_pb2_grpc.GatewayStub(channel)
    try:
        generate(stub, a, 999_999, steps=2)   # warm-up; a seed no measured request uses (no cache hit)
        for mode in a.caches:
            # cache=none fills the top level (as before the cache parameter); each other mode its own key
            target = results if mode == "none" else results.setdefault(f"cache_{mode}", {"throughput": {}})
            mesh_rounds(stub, a, out, report, results, target, mode, proc.pid)
        return results
    finally:
        channel.close()
        stop_mesh(proc)


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
    parser.add_argument("--phases", default="peer,floor,mesh",
                        help="comma-separated: peer, compiled-peer, floor, levers, mesh (run in this order)")
    parser.add_argument("--skip-peer", action="store_true", help="drop peer from --phases")
    parser.add_argument("--skip-floor", action="store_true", help="drop floor (the in-process compute floor)")
    parser.add_argument("--peer-runs", type=int, default=5, help="videos one after another, per peer")
    parser.add_argument("--peer-batch", type=int, default=0, help="prompts in one eager pipeline call (0 = skip)")
    parser.add_argument("--compiled-peer-batch", type=int, default=16, help="prompts in one compiled call (0 = skip)")
    parser.add_argument("--latency-runs", type=int, default=3, help="mesh videos one after another")
    parser.add_argument("--compile-rows", default="", help="denoiser batch sizes (rows) to torch.compile, e.g. 2,32")
    parser.add_argument("--compile-backend", default="inductor", choices=["inductor", "precompile", "aoti"],
                        help="the denoiser's T2V_COMPILE_BACKEND: torch.compile, or packages (Dynamo's precompile, "
                             "AOTInductor) in --compile-cache (built on the first start, loaded on the next)")
    parser.add_argument("--compile-cache", type=Path, default=Path("/tmp/t2v-compile-cache"),
                        help="the denoiser's T2V_COMPILE_CACHE")
    parser.add_argument("--cold-start", action="store_true", help="empty --compile-cache before the mesh starts")
    parser.add_argument("--restarts", type=int, default=0, help="stop and start the mesh again this often (warm cache)")
    parser.add_argument("--restart-env", default="", help="extra environment per restart, ';' between restarts, "
                                                          "',' between variables: T2V_DEEP_CACHE_COMPILE=false;")
    parser.add_argument("--lever-rows", default="2,16,32", help="batch sizes (rows) of the levers phase")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip what would end after this many seconds")
    parser.add_argument("--reserve-s", type=float, default=0.0,
                        help="seconds the mesh's rounds leave for the phases after it")
    parser.add_argument("--caches", default="none", help="the mesh's rounds for each: none (exact), deep (DeepCache)")
    parser.add_argument("--quick", action="store_true", help="CPU smoke test of this script")
    a = parser.parse_args()
    a.concurrency = [int(c) for c in a.concurrency.split(",") if c]
    a.caches = [c for c in a.caches.split(",") if c]
    phases = [p for p in a.phases.split(",") if p and not (p == "peer" and a.skip_peer)
              and not (p == "floor" and a.skip_floor)]
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(LOGS, ignore_errors=True)
    LOGS.mkdir(parents=True)
    if a.quick:
        a.model, a.steps, a.frames, a.size, a.max_batch, a.concurrency = DEFAULT_MODEL, 2, 4, 64, 4, [2]
        a.peer_runs, a.latency_runs, a.compile_rows, a.caches = 2, 2, "", ["none", "deep"]
        phases = [p for p in phases if p not in {"compiled-peer", "levers"}]
    device = torch.device("cpu" if a.quick else "cuda")
    dtype = torch.float32 if a.quick else torch.float16
    report: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    "torch": torch.__version__, "steps": a.steps, "frames": a.frames, "size": a.size,
                    "phases": phases, "argv": sys.argv[1:], "host": host_info(), "max_batch": a.max_batch,
                    "settings_env": {k: v for k, v in os.environ.items()   # the mesh's, and Inductor's tuning
                                     if k.startswith(("T2V_", "TORCHINDUCTOR_"))
                                     and not any(w in k for w in ("KEY", "SECRET", "TOKEN", "PASSWORD", "DSN"))}}
    try:
        import triton
        report["triton"] = triton.__version__
    except ImportError:
        report["triton"] = None
    import av
    import diffusers
    import grpc
    report["diffusers"] = diffusers.__version__
    # the decoder's MP4 encoding is CPU work in PyAV's own FFmpeg: its version moves the non-GPU share
    report["packages"] = {"av": av.__version__, "libavcodec": ".".join(map(str, av.library_versions["libavcodec"])),
                          "grpc": grpc.__version__}
    try:
        run_phases(a, phases, device, dtype, report)
    finally:
        with tarfile.open(a.out / "logs.tgz", "w:gz") as tar:   # not the gateway's state (its videos)
            tar.add(LOGS, arcname="logs", filter=lambda info: None if "/state" in info.name else info)


def run_phases(a, phases: list[str], device, dtype, report: dict) -> None:

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

    save()
    report["compile_rows"] = a.compile_rows
    report["compile_backend"] = a.compile_backend
    from services.denoiser.compile_cache import CompileCache, identity, read_manifest, verdict

    cache = CompileCache(a.compile_cache, identity(device))
    warm_cache = verdict(read_manifest(cache.folder), cache.identity)[0] and not a.cold_start
    report["compile_cache_found"] = "warm" if warm_cache else "none or untrusted"
    # Seconds each phase needs (H200, 16x256x256, 50 steps): a cold compile is ~2.5 min per compiled size.
    compiles = len([r for r in a.compile_rows.split(",") if r])
    guesses = {"peer": 15 + 4 * a.peer_runs, "compiled-peer": 330, "floor": 40, "levers": 40,
               "mesh": 60 + (40 if warm_cache else 150) * compiles}
    for phase in phases:
        if not fits(a, guesses[phase], phase, report):
            continue
        with watch() as cpu:
            run_phase(a, phase, device, dtype, report)
        report.setdefault("host_load", {})[phase] = cpu
        log(phase, "done" if phase == "mesh" else report.get(phase.replace("-", "_")), "host", describe(cpu))
        save()
    (a.out / "results.md").write_text(summarise(report))
    print(summarise(report))


def run_phase(a, phase: str, device, dtype, report: dict) -> None:
    """One of --phases, its results into ``report``."""
    if phase == "peer":
        report["peer"] = bench_peer(a.model, device, dtype, a)
    elif phase == "compiled-peer":
        # Its own Inductor cache, emptied: the compile it reports is a cold one, as a user's first.
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = "/tmp/t2v-peer-inductor"
        os.environ["TRITON_CACHE_DIR"] = "/tmp/t2v-peer-inductor/triton"
        shutil.rmtree("/tmp/t2v-peer-inductor", ignore_errors=True)
        report["compiled_peer"] = bench_peer(a.model, device, dtype, a, compiled=True)
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        os.environ.pop("TRITON_CACHE_DIR")
    elif phase == "floor":
        report["floor"] = bench_compute_floor(a.model, device, dtype, a)
    elif phase == "levers":
        report["levers"] = bench_levers(a.model, device, dtype, a)
    elif phase == "mesh":
        report["mesh"] = bench_mesh(a.model, a, a.out, report)
    else:
        raise SystemExit(f"unknown phase {phase!r}")


def summarise(r: dict) -> str:
    """results.md: every figure of the run, with ratios to the peers measured in it."""
    mesh, floor = r.get("mesh", {}), r.get("floor")
    peer = r.get("peer", {}).get("latency_s")
    compiled = r.get("compiled_peer", {})
    flops, ceiling = r["unet_flops_per_cfg_step"], r.get("bf16_matmul_tflops") or float("nan")
    host = r.get("host", {})
    lines = [f"device {r['device']}, torch {r['torch']}, triton {r.get('triton')}, diffusers {r['diffusers']}, "
             f"{r['frames']}x{r['size']}x{r['size']}, {r['steps']} steps; host CPU {host.get('Model name')} "
             f"({host.get('cpus')} CPUs); GPU {host.get('gpu')}",
             f"denoiser: CUDA graphs (on a GPU), max batch {r.get('max_batch')}"
             + (f", {BACKEND_WORDS.get(r.get('compile_backend'), 'torch.compile')} for "
                f"{r['compile_rows']} rows" if r.get("compile_rows") else ""),
             f"UNet {flops / 1e12:.2f} TFLOP per CFG step; bf16 matmul ceiling {ceiling:.0f} TFLOP/s",
             "", "| measure | value | ratio to the eager peer |", "| --- | --- | --- |"]

    def ratio(seconds: float | None) -> str:
        return f"{seconds / peer:.2f}x" if seconds and peer else ""

    def mfu(videos_per_s: float) -> str:
        return f"{flops * r['steps'] * videos_per_s / 1e12 / ceiling:.0%}"

    if peer:
        sp = r["peer"]["latency"]
        lines.append(f"| eager peer, one video (median of {len(sp['runs'])}; min {sp['min']:.2f}, max {sp['max']:.2f}, "
                     f"stdev {sp['stdev']:.3f}) | {peer:.2f} s | 1.00 |")
        if r["peer"].get("batch"):
            lines.append(f"| eager peer, {r['peer']['batch']} prompts in one call | "
                         f"{r['peer']['batch_s_per_video']:.2f} s a video ({r['peer']['batch_videos_per_s']:.3f}/s) | |")
    if compiled:
        sp = compiled["latency"]
        lines.append(f"| compiled peer, one video (median of {len(sp['runs'])}; min {sp['min']:.2f}, max {sp['max']:.2f}; "
                     f"first call with compile {compiled['first_call_s']:.0f} s) | {compiled['latency_s']:.2f} s | "
                     f"{ratio(compiled['latency_s'])} |")
        if compiled.get("batch"):
            lines.append(f"| compiled peer, {compiled['batch']} prompts in one call (first call with compile "
                         f"{compiled['batch_first_call_s']:.0f} s) | {compiled['batch_s_per_video']:.2f} s a video "
                         f"({compiled['batch_videos_per_s']:.3f} videos/s, UNet at {mfu(compiled['batch_videos_per_s'])} "
                         f"of the ceiling) | |")
    for start in mesh.get("starts", []):
        warm = start.get("warm", {})
        status = start.get("warm", {}).get("compile_cache") or start.get("compile_cache", {}).get("status", "?")
        cache = "empty compile cache" if start.get("cache_was_empty") else f"compile cache {status}"
        lines.append(f"| mesh start to all SERVING ({cache}; denoiser load {warm.get('load_s')} s, "
                     f"warm-up {warm.get('warm_s')} s) | {start['seconds']:.1f} s | |")
        if start.get("all_captured_s"):
            lines.append(f"| ... to every graph captured ({warm.get('deferred')} captures after SERVING, idle) | "
                         f"{start['all_captured_s']:.1f} s | |")
    if "latency_s" in mesh:
        sp = mesh["latency"]
        vs_compiled = f", {mesh['latency_s'] / compiled['latency_s']:.2f}x the compiled peer" if compiled else ""
        lines.append(f"| mesh latency, concurrency 1 (median of {len(sp['runs'])}; min {sp['min']:.2f}, max "
                     f"{sp['max']:.2f}){vs_compiled} | {mesh['latency_s']:.2f} s | {ratio(mesh['latency_s'])} |")
        lines.append(f"| GPU time per video (stage metrics) | {mesh['gpu_s_per_video']:.2f} s | |")
        lines.append(f"| non-GPU share of mesh latency | {mesh['non_gpu_share']:.1%} | |")
        for stage, seconds in mesh.get("stage_minus_gpu_s", {}).items():
            lines.append(f"| {stage} stage (as the gateway sees it) minus its GPU time, per video | {seconds:.3f} s | |")
    if floor:
        lines.append(f"| compute floor in one process (no gRPC, no MP4) | {floor['latency_s']:.2f} s | "
                     f"{ratio(floor['latency_s'])} |")
    for c, t in mesh.get("throughput", {}).items():
        vs_compiled = (f", {t['videos_per_s'] / compiled['batch_videos_per_s']:.2f}x the compiled peer's batch"
                       if compiled.get("batch_videos_per_s") else "")
        lines.append(f"| mesh throughput, concurrency {c} (mean batch {t.get('mean_batch') or 0:.1f} requests, "
                     f"{t.get('forwards_over_16', 0):.0f} forwards over 16) | {t['videos_per_s']:.3f} videos/s "
                     f"(UNet at {mfu(t['videos_per_s'])} of the ceiling{vs_compiled}) | "
                     f"{t['videos_per_s'] * peer if peer else float('nan'):.2f}x the peer's videos/s |")
        if t.get("arrivals_s"):
            burst = ", ".join(f"{k} {v['first']:.2f}/{v['median']:.2f}/{v['last']:.2f}" for k, v in t["arrivals_s"].items())
            lines.append(f"| ... its requests at the client, s after the burst (first/median/last) | {burst} | |")
    for key, deep in mesh.items():
        if not key.startswith("cache_") or "latency_s" not in deep:
            continue
        mode = key.removeprefix("cache_")
        speedup = f", {mesh['latency_s'] / deep['latency_s']:.2f}x faster than cache none" if "latency_s" in mesh else ""
        lines.append(f"| mesh latency, concurrency 1, cache {mode}{speedup} | {deep['latency_s']:.2f} s | "
                     f"{ratio(deep['latency_s'])} |")
        for c, t in deep.get("throughput", {}).items():
            exact = mesh.get("throughput", {}).get(c)
            speedup = f", {t['videos_per_s'] / exact['videos_per_s']:.2f}x cache none" if exact else ""
            lines.append(f"| mesh throughput, concurrency {c}, cache {mode} (mean batch {t.get('mean_batch') or 0:.1f})"
                         f" | {t['videos_per_s']:.3f} videos/s{speedup} | |")
    for phase, figures in r.get("host_load", {}).items():
        lines.append(f"| host CPUs during the {phase} phase ({figures.get('seconds')} s) | {describe(figures)} | |")
    if mesh.get("host_load"):
        lines.append(f"| ... during the mesh's latency runs | {describe(mesh['host_load'])} | |")
    for c, t in mesh.get("throughput", {}).items():
        if t.get("host_load"):
            lines.append(f"| ... during the mesh's {c} concurrent | {describe(t['host_load'])} | |")
    plan = next((s["batch_plan"] for s in reversed(mesh.get("starts", [])) if "batch_plan" in s), None)
    if plan:
        lines.append(f"| denoiser batch plan (bucket rows: ms a forward; cap in rows) | {plan.get('ms')}; "
                     f"cap {plan.get('cap_rows')} | |")
    if "levers" in r:
        for name, times in r["levers"]["forward_ms"].items():
            lines.append(f"| one forward as a CUDA graph, {name} | "
                         + ", ".join(f"{rows} rows {ms:.1f} ms" for rows, ms in times.items()) + " | |")
    for skipped in r.get("skipped", []):
        lines.append(f"| skipped | {skipped} | |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
