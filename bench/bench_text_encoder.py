"""A burst of Encode calls at once against the text encoder stage, each call alone against batched.

Why: 16 requests at once reached the denoiser over about a second when every Encode ran its own forward
(docs/benchmarks.md, run F), and the denoiser's batch waited on the last of them. This starts the real
text_encoder stage (gRPC on a loopback port, the model of ``--model``) with ``--batch-prompts 1`` (each
call alone, one forward after another) and with the default 64, and sends ``--burst`` Encode calls of a prompt and the
empty negative prompt at the same instant (a barrier), ``--runs`` times each, interleaved: the time until
the last answer and the forwards the stage ran.

    python bench/bench_text_encoder.py --out /tmp/te                 # embedded model, CPU
    python bench/bench_text_encoder.py --device cuda --dtype float16 --model /tmp/t2v-full --out /tmp/te
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from services.common.config import DEFAULT_MODEL  # noqa: E402
from services.common.server import GrpcServer, message_options  # noqa: E402
from services.text_encoder.server import SERVICE_NAME, TextEncoderConfig, TextEncoderServicer  # noqa: E402
from t2v.v1 import text_encoder_pb2, text_encoder_pb2_grpc  # noqa: E402


class Stage:
    """The text encoder stage on a free loopback port, loaded and SERVING."""

    def __init__(self, model: str, device: str, dtype: str, batch_prompts: int) -> None:
        config = TextEncoderConfig(port=0, model=model, device=device, dtype=dtype, batch_prompts=batch_prompts)
        self.servicer = TextEncoderServicer(config)
        self.server = GrpcServer(config, SERVICE_NAME,
                                 lambda s: text_encoder_pb2_grpc.add_TextEncoderServicer_to_server(self.servicer, s))
        self.port = self.server.start()
        self.servicer.load()
        self.servicer.gate.open()
        self.server.set_serving(True)

    def forwards(self) -> float:
        return self.servicer.metrics.registry.get_sample_value("t2v_text_encoder_batch_prompts_count") or 0.0

    def stop(self) -> None:
        self.server.stop(1)
        self.servicer.close(5)


def burst(port: int, calls: int) -> list[float]:
    """Each call's seconds from the common start to its answer."""
    channels = [grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options(64 << 20)) for _ in range(calls)]
    stubs = [text_encoder_pb2_grpc.TextEncoderStub(channel) for channel in channels]
    for stub in stubs:                                      # connected before the clock starts
        stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["warm", ""]), timeout=60)
    barrier, done = threading.Barrier(calls + 1), [0.0] * calls

    def one(index: int) -> None:
        barrier.wait()
        stubs[index].Encode(text_encoder_pb2.EncodeRequest(prompts=[f"a ball, take {index}", ""]), timeout=60)
        done[index] = time.perf_counter() - started

    threads = [threading.Thread(target=one, args=(i,)) for i in range(calls)]
    for thread in threads:
        thread.start()
    started = time.perf_counter()
    barrier.wait()
    for thread in threads:
        thread.join(120)
    for channel in channels:
        channel.close()
    return done


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--burst", type=int, default=16)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--out", type=Path, required=True)
    a = parser.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    stages = {"alone": Stage(a.model, a.device, a.dtype, 1), "batched": Stage(a.model, a.device, a.dtype, 64)}
    rows: dict[str, dict[str, list[float]]] = {k: {"last_s": [], "first_s": [], "forwards": []} for k in stages}
    try:
        for _ in range(a.runs):
            for kind, stage in stages.items():                 # interleaved: the host's drift hits both
                before = stage.forwards()
                times = burst(stage.port, a.burst)
                rows[kind]["last_s"].append(max(times))
                rows[kind]["first_s"].append(min(times))
                rows[kind]["forwards"].append(stage.forwards() - before - a.burst)   # less the warm-up calls
    finally:
        for stage in stages.values():
            stage.stop()
    report = {"host": {"cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
              "model": a.model, "device": a.device, "dtype": a.dtype, "burst": a.burst, "runs": rows,
              "median": {k: {m: statistics.median(v) for m, v in r.items()} for k, r in rows.items()}}
    try:
        report["host"]["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                                     if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    (a.out / "text_encoder.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report["median"]))
    ratio = report["median"]["alone"]["last_s"] / report["median"]["batched"]["last_s"]
    print(f"burst of {a.burst}: last answer {report['median']['alone']['last_s'] * 1e3:.0f} ms alone, "
          f"{report['median']['batched']['last_s'] * 1e3:.0f} ms batched ({ratio:.2f}x); forwards "
          f"{report['median']['alone']['forwards']:.0f} and {report['median']['batched']['forwards']:.0f}")


if __name__ == "__main__":
    main()
