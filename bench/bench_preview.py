"""What live previews cost the denoiser engine per batched step, on the CPU.

The engine on the embedded model's UNet (models/t2v-world, float32, the CPU), 4 requests of 16 frames at the
model's size (64x64: latents 4 x 16 x 8 x 8) submitted together, so every step is one batch of 4 (8 UNet rows
with guidance). Two configurations, run in turn (A B A B ...) so the drift of a shared machine falls on both:

- ``none``: no request asks for previews;
- ``two``: two of the four ask for one after every step (the most there can be; the gateway's default is
  every 5th), each read by a thread of its own that does what the denoiser's gRPC thread does with it (moves it
  to the CPU, lays the frames out in a grid, writes the PNG: server.preview_to_proto).

Then, within one run (``--interleaved-steps`` steps, two of the four asking every 2nd step), each step with
previews against the mean of the two steps beside it without: the same load falls on both, which whole runs on
a shared machine cannot promise.

Two clocks per batched step. Wall time, as the engine reports it to its observer (engine.StepTimer: the UNet
forward, the guidance, the scheduler steps and, in ``two``, the two previews). And the engine thread's CPU time
(``time.thread_time`` between two steps' reports, so the loop's own bookkeeping too), with torch on one thread
(``--threads 1``, the default) so that all of a step's arithmetic runs in that thread: on a machine shared with
other work, wall time moves with the neighbours' load, CPU time much less. Each run's median step is one
sample; the report gives the median of those samples per configuration, their spread (min - max), and the
difference of the paired runs. Beside it, the preview alone, in CPU time: ``DenoiseEngine.preview`` on one
request's latents (the engine thread's part), and the reader's copy + grid + PNG (the gRPC thread's part),
each over many calls, on the embedded model's latents of the 16x64x64 video and on latents of the 1.7B's
shape (4 x 16 x 32 x 32; random numbers, so its PNG compresses worse than a real preview's).

    python bench/bench_preview.py                 # 7 runs of each, 12 steps a run: 5-10 minutes on 2 cores
    python bench/bench_preview.py --runs 6 --steps 8 --interleaved-steps 30    # docs/benchmarks.md's run
    python bench/bench_preview.py --runs 2 --steps 3 --interleaved-steps 8 --out /tmp/bench-preview   # a smoke run

Prints a JSON document and a markdown table; --out DIR writes results.json and results.md there too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from diffusers import UNet3DConditionModel  # noqa: E402

from services.common.latent_rgb import LatentRgb  # noqa: E402
from services.denoiser import engine as eng  # noqa: E402
from services.denoiser.server import preview_to_proto  # noqa: E402

MODEL = ROOT / "models" / "t2v-world"


class StepTimes(eng.EngineObserver):
    """Called in the engine thread after each step: its wall seconds, and the thread's CPU clock then."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_marks: list[float] = []

    def step(self, batch_size: int, seconds: float) -> None:
        if batch_size == 4:
            self.seconds.append(seconds)
            self.cpu_marks.append(time.thread_time())

    def cpu_seconds(self) -> list[float]:
        """The engine thread's CPU time from one step's report to the next's: a whole loop iteration."""
        return [b - a for a, b in zip(self.cpu_marks, self.cpu_marks[1:])]


def engine_run(unet: Any, scheduler: dict, latent_rgb: LatentRgb, every: list[int], steps: int, seed: int
               ) -> StepTimes:
    """One engine run of len(every) requests (all in one batch), request i asking for a preview every ``every[i]``
    steps (0 = none), each read by a thread as the denoiser's gRPC thread reads it; the steps' times."""
    times = StepTimes()
    engine = eng.DenoiseEngine(unet, scheduler, torch.device("cpu"), torch.float32, max_batch=4, observer=times,
                               latent_rgb=latent_rgb)
    dim = unet.config.cross_attention_dim
    jobs = [engine.submit(eng.Request(f"b{i}", torch.randn(2, 77, dim, generator=torch.Generator().manual_seed(seed + i)),
                                      16, 64, 64, steps, 9.0, seed + i, preview_every=n))
            for i, n in enumerate(every)]

    def read(job: eng.Job) -> None:             # what the gRPC thread does with each event
        while True:
            event = job.events.get()
            if isinstance(event, eng.Preview):
                preview_to_proto(event).SerializeToString()
            elif isinstance(event, (eng.Finished, eng.Failed, eng.Cancelled)):
                assert isinstance(event, eng.Finished), event
                return

    readers = [threading.Thread(target=read, args=(job,)) for job in jobs]
    for reader in readers:
        reader.start()
    engine.start()
    for reader in readers:
        reader.join()
    engine.stop(1.0)
    assert len(times.seconds) == steps, times.seconds
    return times


def one_run(unet: Any, scheduler: dict, latent_rgb: LatentRgb, previews: int, steps: int, seed: int
            ) -> tuple[float, float]:
    """(median wall, median CPU) seconds of a batched step in one engine run of 4 requests, ``previews`` of them
    asking for a preview every step."""
    times = engine_run(unet, scheduler, latent_rgb, [1] * previews + [0] * (4 - previews), steps, seed)
    # the first step pays for warming the allocator; its CPU interval is not measured anyway
    return statistics.median(times.seconds[1:]), statistics.median(times.cpu_seconds())


def interleaved(unet: Any, scheduler: dict, latent_rgb: LatentRgb, steps: int, seed: int
                ) -> dict[str, list[float]]:
    """Two of 4 requests ask for a preview every 2nd step: each even step (previews) against the mean of the odd
    steps either side of it (none), in the same run, so the machine's load is the same for both. Seconds of
    (wall, CPU) differences, one per even step."""
    times = engine_run(unet, scheduler, latent_rgb, [2, 2, 0, 0], steps, seed)
    wall = {s: times.seconds[s - 1] for s in range(1, steps + 1)}
    cpu = {s: times.cpu_seconds()[s - 2] for s in range(2, steps + 1)}     # step s's interval ends at its report
    evens = range(4, steps - 1, 2)                                         # not the last step: a preview too
    return {"wall": [wall[s] - (wall[s - 1] + wall[s + 1]) / 2 for s in evens],
            "cpu": [cpu[s] - (cpu[s - 1] + cpu[s + 1]) / 2 for s in evens]}


def micro(latent_rgb: LatentRgb, shape: tuple[int, ...], calls: int) -> dict[str, float]:
    """CPU microseconds a call: the map on the engine's side, the CPU copy + grid + PNG on the reader's."""
    engine = eng.DenoiseEngine.__new__(eng.DenoiseEngine)       # only the map: no UNet needed
    engine._rgb = latent_rgb.tensors(torch.device("cpu"))      # noqa: SLF001
    latents = torch.randn(shape)
    for _ in range(20):
        engine.preview(latents)
    started = time.thread_time()
    for _ in range(calls):
        rgb = engine.preview(latents)
    mapped = (time.thread_time() - started) / calls
    started = time.thread_time()
    for _ in range(calls):
        png = preview_to_proto(eng.Preview(1, 1, rgb)).png
    encoded = (time.thread_time() - started) / calls
    return {"map_us": round(mapped * 1e6, 1), "png_us": round(encoded * 1e6, 1), "png_bytes": len(png)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="runs of each configuration (default 7)")
    parser.add_argument("--steps", type=int, default=12, help="denoising steps a run (default 12)")
    parser.add_argument("--interleaved-steps", type=int, default=30,
                        help="steps of each interleaved run (default 30; --runs of them)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: see above)")
    parser.add_argument("--out", type=Path, default=None, help="also write results.json and results.md here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    latent_rgb = LatentRgb.load(MODEL)
    if latent_rgb is None:
        raise SystemExit(f"{MODEL} has no vae/latent_rgb.json; run `t2v fit-preview {MODEL}` first")
    unet = UNet3DConditionModel.from_pretrained(MODEL / "unet").eval().requires_grad_(False)
    scheduler = json.loads((MODEL / "scheduler" / "scheduler_config.json").read_text())
    one_run(unet, scheduler, latent_rgb, 0, 3, 99)                  # warm-up, not counted
    wall: dict[str, list[float]] = {"none": [], "two": []}
    cpu: dict[str, list[float]] = {"none": [], "two": []}
    for run in range(args.runs):
        for name, previews in (("none", 0), ("two", 2)) if run % 2 == 0 else (("two", 2), ("none", 0)):
            step_wall, step_cpu = one_run(unet, scheduler, latent_rgb, previews, args.steps, 10 * run)
            wall[name].append(step_wall)
            cpu[name].append(step_cpu)
            print(f"run {run + 1}/{args.runs} {name}: {step_wall * 1e3:.1f} ms a step, {step_cpu * 1e3:.1f} ms CPU "
                  f"(load {os.getloadavg()[0]:.1f})", file=sys.stderr)

    steps_diff: dict[str, list[float]] = {"wall": [], "cpu": []}
    for run in range(max(1, args.runs // 2)):
        diffs = interleaved(unet, scheduler, latent_rgb, args.interleaved_steps, 100 + run)
        for clock in steps_diff:
            steps_diff[clock] += diffs[clock]
        print(f"interleaved run {run + 1}: CPU +{statistics.median(diffs['cpu']) * 1e3:.2f} ms a preview step",
              file=sys.stderr)

    def summary(values: list[float]) -> dict[str, float]:
        return {"median_ms": round(statistics.median(values) * 1e3, 2), "min_ms": round(min(values) * 1e3, 2),
                "max_ms": round(max(values) * 1e3, 2)}

    def compare(samples: dict[str, list[float]]) -> dict[str, Any]:
        none, two = summary(samples["none"]), summary(samples["two"])
        pairs = [b - a for a, b in zip(samples["none"], samples["two"])]
        return {"none": none, "two_every_step": two,
                "difference_ms": {"median_of_run_pairs": round(statistics.median(pairs) * 1e3, 2),
                                  "min": round(min(pairs) * 1e3, 2), "max": round(max(pairs) * 1e3, 2)},
                "difference_percent": round(100 * statistics.median(pairs) / none["median_ms"] * 1e3, 2)}

    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "load_average": [round(v, 2) for v in os.getloadavg()]},
        "setup": {"model": "models/t2v-world", "dtype": "float32", "device": "cpu", "requests": 4,
                  "shape": "16x64x64 (latents 4x16x8x8)", "guidance": 9.0, "steps_a_run": args.steps,
                  "runs_each": args.runs, "torch_threads": args.threads},
        "step_wall": compare(wall), "step_cpu": compare(cpu),
        "interleaved": {clock: {"median_ms": round(statistics.median(v) * 1e3, 3),
                                "p25_ms": round(statistics.quantiles(v, n=4)[0] * 1e3, 3),
                                "p75_ms": round(statistics.quantiles(v, n=4)[2] * 1e3, 3), "steps": len(v)}
                        for clock, v in steps_diff.items()},
        "preview_alone_world": micro(latent_rgb, (1, 4, 16, 8, 8), 2000),
        "preview_alone_1_7b_shape": micro(latent_rgb, (1, 4, 16, 32, 32), 500),
        "samples_ms": {clock: {name: [round(v * 1e3, 2) for v in values] for name, values in samples.items()}
                       for clock, samples in (("wall", wall), ("cpu", cpu))},
        "load_average_after": [round(v, 2) for v in os.getloadavg()],
    }
    rows = []
    for clock in ("cpu", "wall"):
        c = result[f"step_{clock}"]
        none, two, diff = c["none"], c["two_every_step"], c["difference_ms"]
        rows += [f"| {clock} | none asks | {none['median_ms']:.1f} ms | {none['min_ms']:.1f} - {none['max_ms']:.1f} ms |",
                 f"| {clock} | two ask, every step | {two['median_ms']:.1f} ms | {two['min_ms']:.1f} - "
                 f"{two['max_ms']:.1f} ms |",
                 f"| {clock} | difference (paired runs) | {diff['median_of_run_pairs']:+.2f} ms "
                 f"({c['difference_percent']:+.2f} %) | {diff['min']:+.2f} - {diff['max']:+.2f} ms |"]
    inter = result["interleaved"]
    table = "\n".join([
        "| clock | 4 requests batched | step, median of the runs' medians | spread (min - max) |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "| clock | a step with two previews minus the mean of its two neighbours without (same run) | "
        "middle half (p25 - p75) | steps |",
        "| --- | --- | --- | --- |",
        *[f"| {clock} | {inter[clock]['median_ms']:+.3f} ms | {inter[clock]['p25_ms']:+.2f} - "
          f"{inter[clock]['p75_ms']:+.2f} ms | {inter[clock]['steps']} |" for clock in ("cpu", "wall")],
        "",
        "| preview alone, one request, CPU time | map (engine thread) | copy + grid + PNG (reader thread) | PNG bytes |",
        "| --- | --- | --- | --- |",
        *[f"| latents {label} | {m['map_us']:.0f} us | {m['png_us']:.0f} us | {m['png_bytes']} |"
          for label, m in (("4x16x8x8 (t2v-world)", result["preview_alone_world"]),
                           ("4x16x32x32 (1.7B at 256x256)", result["preview_alone_1_7b_shape"]))],
    ])
    print(json.dumps(result, indent=2))
    print(table)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
        (args.out / "results.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
