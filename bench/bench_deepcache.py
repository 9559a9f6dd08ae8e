"""DeepCache in the denoise engine, in one process: speed-up and fidelity against the exact path.

For each DeepCache skip branch (``--branches``) and interval (``--intervals``), and the exact path, on the
same prompts and seeds: the engine's wall time for --prompts videos submitted at once (throughput) and
for one video alone (latency, median of --latency-runs), and the PSNR of each VAE-decoded video against
the exact one. The prompts are the held-out ones of ``t2v.train.adherence``; with --checker (embedded
model) the checker judges each video's colour, shape and motion, exact and deep, as
tests/e2e/test_adherence.py does through the mesh (here on the decoded frames, without the MP4). On a
GPU (``--device cuda``) with ``--graphs`` and ``--compile-rows`` the engine runs as the denoiser does
(CUDA graphs, compiled buckets), and each forward (exact, DeepCache full, shallow) is timed alone at
--probe-rows. No gRPC, no MP4: only the denoiser's part changes.

    python bench/bench_deepcache.py --prompts 16 --checker --out /tmp/dc                  # CPU, embedded model
    python bench/bench_deepcache.py --model /tmp/t2v-full --device cuda --dtype float16 --graphs \\
        --compile-rows 2,32 --frames 16 --size 256 --prompts 16 --out /tmp/dc        # GPU, full model
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.common.config import DEFAULT_MODEL  # noqa: E402
from services.denoiser import engine as eng  # noqa: E402


def log(*parts: object) -> None:
    print(time.strftime("%H:%M:%S"), *parts, flush=True)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two [F, H, W, 3] frame stacks in [0, 1]."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def run_engine(engine: eng.DenoiseEngine, requests: list[eng.Request]) -> tuple[list[torch.Tensor], float]:
    """Submit every request at once; their final latents and the wall seconds until the last finished."""
    sync(engine.device)
    started = time.perf_counter()
    jobs = [engine.submit(r) for r in requests]
    out = []
    for job in jobs:
        while not isinstance(event := job.events.get(timeout=1800), (eng.Finished, eng.Failed, eng.Cancelled)):
            pass
        if not isinstance(event, eng.Finished):
            raise RuntimeError(f"request {job.request.request_id} ended {event}")
        out.append(event.latents)
    return out, time.perf_counter() - started


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--branches", default="-1,0", help="DeepCache skip branches (-1 = the whole first blocks); "
                                                         "a trailing e (e.g. 1e) leaves that branch's forwards eager")
    parser.add_argument("--intervals", default="3", help="DeepCache intervals to run with each branch")
    parser.add_argument("--prompts", type=int, default=16, help="held-out adherence prompts, submitted at once: "
                                                              "throughput, PSNR and adherence")
    parser.add_argument("--latency-runs", type=int, default=2, help="videos alone, one after another")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=0, help="pixels (0 = the model's default)")
    parser.add_argument("--guidance", type=float, default=9.0)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--graphs", action="store_true", help="CUDA graphs (as the denoiser on a GPU)")
    parser.add_argument("--compile-rows", default="", help="torch.compile these buckets (rows), e.g. 2,32")
    parser.add_argument("--compile-cache", type=Path, default=None,
                        help="the denoiser's T2V_COMPILE_CACHE: compile into it (a mesh started after uses it)")
    parser.add_argument("--no-deep-compile", action="store_true", help="leave DeepCache's forwards eager")
    parser.add_argument("--probe-rows", default="2,16,32", help="with --graphs: time one replay of each forward "
                                                               "at these rows")
    parser.add_argument("--checker", action="store_true", help="judge adherence (embedded model only)")
    parser.add_argument("--budget-s", type=float, default=1e9, help="skip runs that would start after this")
    parser.add_argument("--make-model", default="", help="build this preset (e.g. full) into --model if it is missing")
    a = parser.parse_args()
    import logging
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    started_all = time.monotonic()
    a.out.mkdir(parents=True, exist_ok=True)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    if a.make_model and not Path(a.model, "model_index.json").exists():
        from t2v.modelgen import make_model
        log("building the model", a.make_model, make_model(a.make_model, Path(a.model), device=a.device, dtype=a.dtype))
    compile_rows = {int(r) for r in a.compile_rows.split(",") if r}
    cache = None
    if a.compile_cache and compile_rows:
        from services.denoiser.compile_cache import CompileCache, identity
        cache = CompileCache(a.compile_cache, identity(device))
        log("compile cache", cache.open())

    from services.decoder.vae import VaeDecoder
    from services.text_encoder.encoder import TextEncoder
    from t2v.train import adherence, checker

    encoder = TextEncoder(a.model, device, dtype)
    vae = VaeDecoder(a.model, device, dtype)
    cases = adherence.cases("heldout", False, a.prompts)
    embeddings = [encoder.encode(["", case.prompt]) for case in cases]
    report: dict = {"model": a.model, "device": str(device), "dtype": a.dtype, "steps": a.steps, "frames": a.frames,
                    "prompts": a.prompts, "argv": sys.argv[1:], "torch": torch.__version__, "results": {},
                    "warm": {}, "probe_ms": {}}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)

    def save() -> None:
        (a.out / "results.json").write_text(json.dumps(report, indent=2, default=str))

    base = eng.DenoiseEngine.from_folder(a.model, device, dtype, max_batch=a.max_batch, deep_cache_interval=0)
    size = a.size or base.default_size
    shape = (a.frames, size, size)
    unet, scheduler_config = base.unet, base.scheduler_config
    del base

    def requests(cache_mode: str, which: list[int], tag: str) -> list[eng.Request]:
        return [eng.Request(f"{tag}-{i}", embeddings[i % len(embeddings)], a.frames, size, size, a.steps,
                            a.guidance, cases[i % len(cases)].seed, cache=cache_mode) for i in which]

    def make(branch: int, deep_compile: bool) -> eng.DenoiseEngine:
        engine = eng.DenoiseEngine(unet, scheduler_config, device, dtype, max_batch=a.max_batch,
                                   deep_cache_interval=3, deep_cache_branch=None if branch < 0 else branch,
                                   deep_cache_compile=deep_compile)
        if compile_rows:
            engine.use_compile(compile_rows)
        if a.graphs:
            engine.use_cuda_graphs()
        if a.graphs or compile_rows:       # on the CPU nothing is captured or compiled: no warm-up needed
            started = time.perf_counter()
            spent = engine.warm([shape])
            report["warm"][f"branch {engine.deep_branch}"] = {"seconds": time.perf_counter() - started, **spent,
                                                             "plan": engine.plans.get(shape),
                                                             "deep_compiled": deep_compile}
            log("warm", branch, report["warm"][f"branch {engine.deep_branch}"])
        return engine.start()

    @torch.inference_mode()
    def probe(engine: eng.DenoiseEngine, deep_compile: bool) -> dict:
        """One forward of each kind (exact, DeepCache full, shallow) replayed as a graph, in ms."""
        sample_shape = (engine.latent_channels, a.frames, *engine.latent_size(size, size))
        shapes = (sample_shape, (), (77, engine.embedding_dim))
        dtypes = (dtype, torch.long, dtype)
        with torch.inference_mode():
            x = torch.zeros((1, *sample_shape), device=device, dtype=dtype)
            _, features = engine._deep.full(x, torch.zeros(1, dtype=torch.long, device=device),
                                            torch.zeros((1, 77, engine.embedding_dim), device=device, dtype=dtype))
        found = {}
        for rows in [int(r) for r in a.probe_rows.split(",") if r]:
            found[rows] = {
                "exact": engine._forward.time(rows, shapes, dtypes) * 1e3,
                "deep_full": engine._deep_full.time(rows, shapes, dtypes) * 1e3,
                "shallow": engine._deep_shallow.time(rows, shapes + (tuple(features.shape[1:]),),
                                                     dtypes + (dtype,)) * 1e3,
                "exact_compiled": rows in compile_rows, "deep_compiled": rows in compile_rows and deep_compile}
        return found

    def measure(engine: eng.DenoiseEngine, cache_mode: str, name: str) -> dict:
        before = dict(vars(engine.stats))
        latents, wall = run_engine(engine, requests(cache_mode, list(range(len(cases))), name))
        result: dict = {"batch_wall_s": wall, "videos_per_s": len(cases) / wall}
        frames = [vae.decode(x.to(device)) for x in latents]
        lat = [run_engine(engine, requests(cache_mode, [i], f"{name}-lat"))[1] for i in range(a.latency_runs)]
        result.update(latency_s=statistics.median(lat) if lat else float("nan"), latencies_s=lat)
        result["stats"] = {k: v - before.get(k, 0) for k, v in vars(engine.stats).items()}
        return {"result": result, "frames": frames}

    def judge(frames: list[torch.Tensor]) -> dict:
        clips = [((f.clamp(0, 1) * 255).round().to(torch.uint8).numpy(), case.spec) for f, case in zip(frames, cases)]
        return checker.accuracy(clips)

    exact = None
    for spec in [b for b in a.branches.split(",") if b]:
        branch, deep_compile = int(spec.rstrip("e")), not (spec.endswith("e") or a.no_deep_compile)
        if time.monotonic() - started_all > a.budget_s:
            report.setdefault("skipped", []).append(f"branch {spec}")
            continue
        engine = make(branch, deep_compile)
        if cache is not None:      # everything this run compiles is compiled now: a mesh started later may use it
            cache.complete(compile_rows=sorted(compile_rows), warm_shapes="x".join(map(str, shape)),
                           by="bench_deepcache", deep_cache_branch=engine.deep_branch, deep_compiled=deep_compile)
            cache = None
        if a.graphs:
            report["probe_ms"][f"branch {engine.deep_branch}"] = probe(engine, deep_compile)
            log("probe", engine.deep_branch, report["probe_ms"][f"branch {engine.deep_branch}"])
        if exact is None:
            exact = measure(engine, "none", "exact")
            report["results"]["exact"] = exact["result"]
            if a.checker:
                report["results"]["exact"]["adherence"] = judge(exact["frames"])
            log("exact", report["results"]["exact"])
            save()
        for interval in [int(n) for n in a.intervals.split(",") if n]:
            if time.monotonic() - started_all > a.budget_s:
                report.setdefault("skipped", []).append(f"branch {branch} interval {interval}")
                continue
            engine.deep_interval = interval
            got = measure(engine, "deep", f"deep{interval}-{branch}")
            result = got["result"]
            values = [psnr(x, y) for x, y in zip(got["frames"], exact["frames"])]
            result["psnr_db"] = {"mean": statistics.mean(values), "min": min(values), "max": max(values),
                                 "median": statistics.median(values)}
            result.update(branch=engine.deep_branch, interval=interval, deep_compiled=deep_compile and bool(compile_rows),
                          latency_speedup=exact["result"]["latency_s"] / result["latency_s"],
                          throughput_speedup=result["videos_per_s"] / exact["result"]["videos_per_s"])
            if a.checker:
                result["adherence"] = judge(got["frames"])
            report["results"][f"deep {interval}:{engine.deep_branch}"] = result
            log("deep", interval, engine.deep_branch, {k: v for k, v in result.items() if k != "stats"})
            save()
        engine.stop(1)
        del engine
        if device.type == "cuda":
            torch.cuda.empty_cache()
    lines = [f"| setting | latency s (c=1) | videos/s ({a.prompts} at once) | speed-up c=1 / c={a.prompts} | "
             "PSNR dB mean (min) | adherence all |", "| --- | --- | --- | --- | --- | --- |"]
    for name, r in report["results"].items():
        speed = (f"{r['latency_speedup']:.2f}x / {r['throughput_speedup']:.2f}x" if "latency_speedup" in r else "")
        fidelity = f"{r['psnr_db']['mean']:.1f} ({r['psnr_db']['min']:.1f})" if "psnr_db" in r else ""
        adh = f"{r['adherence']['all']:.3f}" if "adherence" in r else ""
        lines.append(f"| {name} | {r['latency_s']:.3f} | {r['videos_per_s']:.3f} | {speed} | {fidelity} | {adh} |")
    (a.out / "results.md").write_text("\n".join(lines) + "\n")
    save()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
