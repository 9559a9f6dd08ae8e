"""When each of a burst of requests reaches each stage, through a mesh on the CPU (the embedded model).

Why: on an H200 the 16 requests of a burst reached the denoiser over about a second (docs/benchmarks.md run
G: 4 in the first second, 12 in the next), while their prompts' encoding takes milliseconds. This runs the
same burst where no GPU is shared between the stages: if the gateway and the text encoder hand every
request to the denoiser within a fraction of that here, the second is spent on the GPU host (the text
encoder's forwards beside the denoiser's), not in the gateway's dispatch. bench_gpu.py records the same
arrivals on a GPU (its ``arrivals_s``).

    .venv/bin/python bench/bench_burst.py --requests 16 --out /tmp/burst      # about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import grpc  # noqa: E402

from bench_gpu import arrivals, generate, host_info, wait_serving  # noqa: E402
from t2v.v1 import gateway_pb2_grpc  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--base-port", type=int, default=56100)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "T2V_MAX_BATCH": str(a.requests), "T2V_SLOTS": str(a.requests),
           "T2V_STATE_DIR": str(a.out / "state"), "T2V_MAX_WORKERS": "64"}
    mesh = subprocess.Popen([sys.executable, "-m", "t2v", "up", "--device", "cpu", "--base-port", str(a.base_port),
                             "--log-dir", str(a.out / "logs")], env=env, cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL)
    try:
        wait_serving(mesh, a.base_port, a.out / "logs", 300)
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(f"127.0.0.1:{a.base_port}"))
        generate(stub, a, 999_999, steps=2)                     # warm-up
        marks: list[dict[str, float]] = [{} for _ in range(a.requests)]
        start = time.perf_counter()
        threads = [threading.Thread(target=generate, args=(stub, a, i), kwargs={"marks": marks[i], "since": start})
                   for i in range(a.requests)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        report = {"host": host_info(), "args": {k: str(v) for k, v in vars(a).items()}, "arrivals_s": arrivals(marks)}
        (a.out / "burst.json").write_text(json.dumps(report, indent=2))
        for name, spread in report["arrivals_s"].items():
            print(f"{name:>20}: first {spread['first'] * 1e3:8.1f} ms, median {spread['median'] * 1e3:8.1f}, "
                  f"last {spread['last'] * 1e3:8.1f}")
    finally:
        mesh.terminate()
        mesh.wait(30)


if __name__ == "__main__":
    main()
