"""The decoder stage alone, one Decode call after another: its wall time, what its own metrics say, and the
CPU its process burns, by thread; per variant of its environment; optionally a py-spy profile.

Why: in the mesh on lent H200 hosts the decoder process used 1.0-1.8 CPU seconds a video (bench/host_load.py's
figures, docs/benchmarks.md run K) for 0.06 s of VAE and ~0.03 s of x264 work, and its MP4 step, what the
VAE does not hide, took 0.11 s a video against 0.03 s for the same encoding in a process of its own (run I).
This starts the real stage (``t2v serve decoder``, gRPC on a loopback port) with each ``--variants`` entry's
environment and tells which threads the CPU time goes to (run K found torch's OpenMP team spinning: hence
``--torch-threads``). py-spy, where installed (``--profile``), records the variants named (its ``--native``
cannot go with ``--nonblocking``, which run K tried: Python stacks only).

    python bench/probe_decoder.py --model /tmp/t2v-full --device cuda --out /tmp/dec
    python bench/probe_decoder.py --out /tmp/dec --calls 3 --frames 4        # embedded model, CPU
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402
import torch  # noqa: E402

from bench.bench_gpu import metric_samples, parse_env, stop_mesh, wait_serving  # noqa: E402
from bench.host_load import PROC, TICKS_PER_S, read_stat  # noqa: E402
from services.common.config import DEFAULT_MODEL  # noqa: E402
from services.common.server import message_options  # noqa: E402
from services.common.tensors import to_proto  # noqa: E402
from t2v.v1 import decoder_pb2, decoder_pb2_grpc  # noqa: E402

METRICS = ("t2v_decoder_vae_decode_duration_seconds_sum", "t2v_decoder_mp4_encode_duration_seconds_sum")


def threads_cpu(pid: int) -> dict[str, float]:
    """CPU seconds so far of each thread of ``pid``, keyed 'tid name' (the kernel's thread name)."""
    found = {}
    for task in (PROC / str(pid) / "task").glob("[0-9]*"):
        stat = read_stat(task)
        try:
            name = (task / "comm").read_text().strip()
        except OSError:
            continue
        if stat is not None:
            found[f"{task.name} {name}"] = stat[1]
    return found


def start(a, env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    """``t2v serve decoder`` with ``env`` on ``port`` (its /metrics on port + 100), once SERVING."""
    cmd = [sys.executable, "-m", "t2v", "serve", "decoder", "--model", a.model, "--device", a.device,
           "--port", str(port), "--metrics-port", str(port + 100)]
    with log.open("w") as output:
        proc = subprocess.Popen(cmd, env={**os.environ, "HF_HUB_OFFLINE": "1", **env}, cwd=ROOT,
                                start_new_session=True, stdout=output, stderr=subprocess.STDOUT)
    try:
        wait_serving(proc, port, log.parent, 300, services=1)
    except SystemExit:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc


def run_variant(a, name: str, env: dict[str, str], port: int, out: Path, profile: bool) -> dict:
    proc = start(a, env, port, out / f"decoder-{name}.log")
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options(256 << 20))
    stub = decoder_pb2_grpc.DecoderStub(channel)
    torch.manual_seed(0)
    size = a.size // 8
    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32

    def decode(i: int) -> float:
        latents = torch.randn(1, 4, a.frames, size, size).to(dtype)
        started = time.perf_counter()
        stub.Decode(decoder_pb2.DecodeRequest(request_id=f"probe-{i}", latents=to_proto(latents), fps=8), timeout=120)
        return time.perf_counter() - started

    try:
        for i in range(2):                       # warm-up: cuDNN's choices, the pinned-memory cache, x264
            decode(i)
        before, threads_before = metric_samples(port + 100, METRICS), threads_cpu(proc.pid)
        process_before = read_stat(PROC / str(proc.pid))[1]
        spy = None
        if profile and shutil.which("py-spy"):
            with (out / f"py-spy-{name}.log").open("w") as spy_log:
                spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", "500", "--format",
                                        "raw", "--threads", "--nonblocking", "--output", str(out / f"py-spy-{name}.txt"),
                                        "--duration", str(a.profile_s)], stdout=spy_log, stderr=subprocess.STDOUT)
            time.sleep(1.0)
        started = time.perf_counter()
        walls = [decode(10 + i) for i in range(a.calls)]
        wall = time.perf_counter() - started
        process_after = read_stat(PROC / str(proc.pid))[1]
        after, threads_after = metric_samples(port + 100, METRICS), threads_cpu(proc.pid)
        idle_before = read_stat(PROC / str(proc.pid))[1]
        time.sleep(a.idle_s)                     # the same process doing nothing: does anything spin?
        idle_cpu = read_stat(PROC / str(proc.pid))[1] - idle_before
        if spy is not None:
            spy.wait(timeout=a.profile_s + 60)
        per_thread = {k: round(v - threads_before.get(k, 0.0), 3) for k, v in threads_after.items()}
        busiest = dict(sorted(((k, v) for k, v in per_thread.items() if v > 0), key=lambda kv: -kv[1])[:24])
        return {"env": env, "calls": a.calls, "wall_s": statistics.median(walls), "walls_s": walls,
                "vae_s_per_call": (after[METRICS[0]] - before[METRICS[0]]) / a.calls,
                "mp4_unhidden_s_per_call": (after[METRICS[1]] - before[METRICS[1]]) / a.calls,
                "cpu_s_per_call": (process_after - process_before) / a.calls,
                "cpu_cores_while_decoding": (process_after - process_before) / wall,
                "idle_cpu_cores": idle_cpu / a.idle_s, "busiest_threads_s": busiest, "threads": len(threads_after)}
    finally:
        channel.close()
        stop_mesh(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--idle-s", type=float, default=3.0, help="seconds the stage is left idle after the calls")
    parser.add_argument("--variants", default="default",
                        help="';'-separated NAME=VAR=VALUE,VAR=VALUE... (or 'default'): the stage's extra environment")
    parser.add_argument("--profile", default="default", help="the variants to record with py-spy, if it is installed")
    parser.add_argument("--profile-s", type=int, default=15)
    parser.add_argument("--base-port", type=int, default=53400)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.device.startswith("cuda") and not Path(a.model, "model_index.json").exists():
        from t2v.modelgen import make_model
        make_model("full", Path(a.model), device="cuda", dtype="float16")
    report: dict = {"device": torch.cuda.get_device_name() if a.device.startswith("cuda") else "cpu",
                    "cpus": os.cpu_count(), "ticks_per_s": TICKS_PER_S, "variants": {}}
    for index, entry in enumerate(v for v in a.variants.split(";") if v):
        name, _, settings = entry.partition("=")
        env = parse_env(settings)
        report["variants"][name] = run_variant(a, name, env, a.base_port + 2 * index, a.out,
                                               name in a.profile.split(","))
        print(name, json.dumps(report["variants"][name]), flush=True)
        (a.out / "decoder.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
