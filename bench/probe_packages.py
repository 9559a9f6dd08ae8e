"""Probe packages of the full UNet on a GPU (precompile or aoti): build, fresh-process load, CUDA-graph replay.

One call answers whether a package of --kind (services/denoiser/aot.py, the lever for the 45 s warm start)
builds, loads fast in a fresh process, replays as a CUDA graph, and matches eager.

For ``--rows`` rows of the sample shape (4, --frames, --latent, --latent) and --tokens tokens, in fp16:
  1. this process: the UNet eager (its output, the forward's and a CUDA-graph replay's time), then the
     package built through aot.py into a fresh temporary folder (its build's seconds) and its output
     against eager;
  2. a FRESH process (as a restarted denoiser): seconds from its start to its imports, to the UNet loaded,
     to the package loaded (and the load alone), to its first output; the loaded model captured in a CUDA
     graph as graphs.py captures (GraphedUNet: a warm-up on a side stream), the median of 20 replays (CUDA
     events), and the replay's output against this process's eager output.
Prints ONE JSON line (also written to --out/probe_packages-KIND-rROWS.json). Builds the full-size random model into
--model first if that folder has none (as bench_gpu.py does).

    SCRIPT=bench/probe_packages.py bash bench/gpu_run.sh --model /tmp/t2v-full --rows 2     # carry .whl
    python bench/probe_packages.py --model /tmp/t2v-full --rows 2 --kind aoti --out /tmp/probe   # installed
    python bench/probe_packages.py --device cpu --model models/t2v-world --frames 2 --latent 8 --out /tmp/probe
                                                     # the script's own check on a CPU (minutes; no graphs)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="/tmp/t2v-full", help="model folder (the full-size random model is "
                                                                 "built there if it has none)")
    parser.add_argument("--rows", type=int, default=2, help="the bucket's rows (2 = one request with guidance)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the results (probe_packages-KIND-rROWS.json)")
    parser.add_argument("--kind", default="precompile", choices=["precompile", "aoti"], help="aot.py's package kind")
    parser.add_argument("--work", type=Path, default=None, help="folder for the package and the inputs (default: "
                                                                "a temporary one, deleted at the end)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--latent", type=int, default=32, help="latent height and width (256 px / 8)")
    parser.add_argument("--tokens", type=int, default=77)
    parser.add_argument("--replays", type=int, default=20, help="CUDA-graph replays timed (median)")
    parser.add_argument("--device", default="cuda", help="cuda (the probe), or cpu (float32, no CUDA graphs: a "
                                                         "check of this script)")
    parser.add_argument("--child-timeout", type=float, default=180.0, help="seconds the fresh process may take")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)     # the fresh process's part
    parser.add_argument("--spawned", type=float, default=0.0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def compare(out: Any, ref: Any) -> dict[str, float]:
    """Max abs difference and relative L2 error (fp32) of ``out`` against ``ref``."""
    a, b = out.float(), ref.float()
    return {"max_abs": float((a - b).abs().max()), "rel_norm": float((a - b).norm() / b.norm().clamp_min(1e-12)),
            "ref_max_abs": float(b.abs().max())}


def sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def forward_ms(forward: Any, inputs: tuple, repeat: int) -> float:
    """Median milliseconds of ``forward(*inputs)``: CUDA events on a GPU, the clock on a CPU."""
    import torch

    times = []
    with torch.inference_mode():
        for _ in range(repeat):
            if inputs[0].device.type != "cuda":
                started = time.perf_counter()
                forward(*inputs)
                times.append((time.perf_counter() - started) * 1e3)
                continue
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(*inputs)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return round(statistics.median(times), 3)


def graph_ms(forward: Any, inputs: tuple, replays: int) -> tuple[float | None, Any]:
    """Capture ``forward`` for these inputs as the engine does (graphs.GraphedUNet), time ``replays`` replays
    (median ms), and return the replay's output for ``inputs``. On a CPU: no graph (None, the direct output)."""
    import torch

    from services.denoiser.graphs import GraphedUNet

    if inputs[0].device.type != "cuda":
        with torch.inference_mode():
            return None, forward(*inputs)

    rows = inputs[0].shape[0]
    graphed = GraphedUNet(forward, device=inputs[0].device, buckets=[rows], name="probe")
    shapes = tuple(tuple(x.shape[1:]) for x in inputs)
    dtypes = [x.dtype for x in inputs]
    seconds = graphed.time(rows, shapes, dtypes, repeat=replays)
    with torch.inference_mode():
        out = graphed(*inputs)
    torch.cuda.synchronize()
    return round(seconds * 1e3, 3), out


def load_unet(model: str, device: Any, dtype: Any) -> Any:
    from diffusers import UNet3DConditionModel

    from services.common.model_folder import model_part

    unet = UNet3DConditionModel.from_pretrained(model_part(model, "unet"), dtype=dtype)
    return unet.to(device).eval().requires_grad_(False)


def child(a: argparse.Namespace) -> dict[str, Any]:
    """The fresh process: load the package the parent built, run it, capture it."""
    t0 = a.spawned or time.time()
    import torch

    from services.denoiser.aot import AotBuckets

    result: dict[str, Any] = {"imports_s": round(time.time() - t0, 2)}
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    unet = load_unet(a.model, device, dtype)
    sync(device)
    result["unet_loaded_s"] = round(time.time() - t0, 2)
    saved = torch.load(a.work / "probe_inputs.pt", map_location=device)
    x, t, e = saved["inputs"]
    buckets = AotBuckets(unet, a.work / "cache", embedding_dim=int(unet.config.cross_attention_dim), kind=a.kind)
    started = time.time()
    with torch.inference_mode():
        forward = buckets.bucket(x.shape[0], tuple(x.shape[1:]), e.shape[1], dtype, device)
        sync(device)
        result["package_s"] = round(time.time() - started, 2)     # load, weights handed over, one trial call
        (info,) = buckets.info.values()
        result.update(status=info["status"], package_load_s=info.get("load_s"))
        out = forward(x, t, e)
        sync(device)
    result["first_output_s"] = round(time.time() - t0, 2)
    result["direct_vs_eager"] = compare(out, saved["eager"])
    result["graph_replay_ms"], replayed = graph_ms(forward, (x, t, e), a.replays)
    result["graph_vs_eager"] = compare(replayed, saved["eager"])
    return result


def parent(a: argparse.Namespace) -> dict[str, Any]:
    import torch

    from services.denoiser import compile_cache
    from services.denoiser.aot import AotBuckets

    started = time.time()
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    result: dict[str, Any] = {"kind": a.kind, "rows": a.rows, "sample": [4, a.frames, a.latent, a.latent], "tokens": a.tokens,
                              "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
                              "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                              "identity": compile_cache.identity(device).key()}
    if not Path(a.model, "model_index.json").exists() and device.type == "cuda":
        from t2v.modelgen import make_model

        made = time.time()
        make_model("full", Path(a.model), device="cuda", dtype="float16")
        result["make_model_s"] = round(time.time() - made, 1)
    unet = load_unet(a.model, device, dtype)
    dim = int(unet.config.cross_attention_dim)
    g = torch.Generator(device.type).manual_seed(0)
    x = torch.randn((a.rows, 4, a.frames, a.latent, a.latent), generator=g, device=device, dtype=dtype)
    t = torch.full((a.rows,), 500, device=device, dtype=torch.long)
    e = torch.randn((a.rows, a.tokens, dim), generator=g, device=device, dtype=dtype)

    def eager(sample: Any, timesteps: Any, embeddings: Any) -> Any:
        return unet(sample, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]

    with torch.inference_mode():
        ref = eager(x, t, e)
    result["eager_ms"] = forward_ms(eager, (x, t, e), 5 if device.type == "cuda" else 1)
    result["eager_graph_ms"], _ = graph_ms(eager, (x, t, e), a.replays)
    torch.save({"inputs": (x, t, e), "eager": ref}, a.work / "probe_inputs.pt")

    folder = a.work / "cache"
    shutil.rmtree(folder, ignore_errors=True)
    buckets = AotBuckets(unet, folder, embedding_dim=dim, kind=a.kind)
    built = time.time()
    with torch.inference_mode():
        forward = buckets.bucket(a.rows, tuple(x.shape[1:]), a.tokens, dtype, device)
        sync(device)
        result["build_total_s"] = round(time.time() - built, 1)
        (info,) = buckets.info.values()
        result["build"] = info
        if info["status"] == "fallback":
            result["error"] = "the package was not built: " + info.get("why", "?")
            return result
        result["package_mb"] = round(info.get("size", 0) / 2**20, 1)
        result["direct_vs_eager"] = compare(forward(x, t, e), ref)
    result["package_ms"] = forward_ms(forward, (x, t, e), 5 if device.type == "cuda" else 1)
    del forward, buckets
    if device.type == "cuda":
        torch.cuda.empty_cache()

    spawned = time.time()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", a.model, "--out", str(a.out),
           "--work", str(a.work), "--device", a.device, "--kind", a.kind,
           "--rows", str(a.rows), "--replays", str(a.replays), "--spawned", repr(spawned)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=a.child_timeout,
                              env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])})
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        result["fresh_process"] = json.loads(lines[-1]) if lines else {
            "error": f"exit {proc.returncode}", "stderr_tail": proc.stderr[-3000:]}
    except subprocess.TimeoutExpired:
        result["fresh_process"] = {"error": f"no answer within {a.child_timeout:.0f} s"}
    fresh = result["fresh_process"]
    result["ok"] = bool(fresh.get("status") == "loaded" and result["direct_vs_eager"]["rel_norm"] < 1e-2
                        and fresh.get("graph_vs_eager", {}).get("rel_norm", 1.0) < 1e-2)
    result["probe_s"] = round(time.time() - started, 1)
    return result


def main(argv: list[str] | None = None) -> None:
    import logging

    # aot.py's lines (built, loaded) on stderr as they come: a call cut by its time limit still says
    # how far the build got
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    a = parse(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    if a.child:
        print(json.dumps(child(a)), flush=True)
        return
    temporary = a.work is None
    a.work = Path(tempfile.mkdtemp(prefix="probe-packages-")) if temporary else a.work
    a.work.mkdir(parents=True, exist_ok=True)
    try:
        result = parent(a)
    finally:
        if temporary:
            shutil.rmtree(a.work, ignore_errors=True)
    line = json.dumps(result)
    (a.out / f"probe_packages-{a.kind}-r{a.rows}.json").write_text(line + "\n")
    print(line, flush=True)


if __name__ == "__main__":
    main()
