"""A soak: mixed load on a local mesh for MINUTES, with a fault every FAULT_EVERY seconds, ending with
every accepted job terminal and no slot held (issue 16).

The faults, in turn: a stage killed with SIGKILL and started again a few seconds later (the denoiser,
the text encoder, the decoder), the state dir's disk filled to the last byte for 20 s and then freed
(a real tmpfs, mounted here: needs root; without it that fault is skipped and the report says so),
and a flood of Generate streams over the gateway's stream cap, during which the health check's and
ListJobs' answer times are measured. The load: CLIENTS threads, each with one job at a time (gRPC
SubmitJob or HTTP POST /v1/videos, then polled until it ends), so it is bounded by construction.

At the end the load stops, every accepted job is waited for (up to 3 minutes), one more job must
complete, the gateway's t2v_gateway_jobs_in_flight must read 0, and each process's resident memory
(sampled every minute) gives its growth. On loopback only; ports chosen at run time.

    sudo python bench/soak.py --minutes 30 --out docs/soak-2026-12-01.json
    python bench/soak.py --minutes 1 --fault-every 15      # what tests/e2e/test_soak.py runs
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402

from bench.load import rss_mb  # noqa: E402
from services.common.config import DEFAULT_MODEL  # noqa: E402
from t2v.up import Mesh, MeshPorts, free_port, health_status  # noqa: E402
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2  # noqa: E402

S = gateway_pb2
TERMINAL = {S.JOB_STATUS_COMPLETED, S.JOB_STATUS_FAILED, S.JOB_STATUS_CANCELLED, S.JOB_STATUS_EXPIRED}
DISK_BYTES = 64 << 20
SMALL = {"num_frames": 2, "height": 32, "width": 32}


# --- the mesh, its disk, its faults ----------------------------------------------------------------------
class SmallDisk:
    """A real tmpfs for the state dir (mounted when this process may), and a filler that takes its last byte."""

    def __init__(self, where: Path) -> None:
        self.path = where
        where.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "t2v-soak", str(where)],
                              capture_output=True, text=True)
        self.mounted = done.returncode == 0
        self.why_not = "" if self.mounted else (done.stderr.strip() or "mount failed")
        self.filler = where / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (1 << 20, 1 << 16, 4096, 512, 1):
                while True:
                    try:
                        os.write(fd, b"\0" * size)
                    except OSError as error:
                        if error.errno != errno.ENOSPC:
                            raise
                        break
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)

    def close(self) -> None:
        self.free()
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.path)], check=False)


class SoakMesh:
    """``t2v.up.Mesh`` on free loopback ports; logs outside the small disk, state on it."""

    def __init__(self, work: Path, state: Path, max_streams: int, model: str) -> None:
        self.http_port, self.metrics_port = free_port(), free_port()
        gateway_args = [f"--http-port={self.http_port}", f"--metrics-port={self.metrics_port}", "--slots=4",
                        "--max-queue=64", f"--max-streams={max_streams}"]
        self.log_dir = work / "logs"
        self.mesh = Mesh("127.0.0.1", MeshPorts(*(free_port() for _ in range(4))), model, device="cpu",
                         dtype="float32", log_dir=self.log_dir, state_dir=state,
                         extra_args={"gateway": gateway_args}, metrics_offset=-1, http_offset=-1,
                         env={"OMP_NUM_THREADS": "1"})

    def start(self) -> None:
        self.mesh.start(timeout=240, echo=sys.stderr)

    def stop(self) -> None:
        self.mesh.stop(grace=10.0)

    def address(self, stage: str = "gateway") -> str:
        return self.mesh.address(stage)

    def kill_and_restart(self, stage: str, down_seconds: float) -> float:
        """SIGKILL ``stage``, wait, start it again; seconds until it is SERVING again."""
        proc = self.mesh.processes[stage]
        proc.kill()
        proc.wait(30)
        time.sleep(down_seconds)
        log = open(self.log_dir / f"{stage}.log", "ab")  # noqa: SIM115 - closed by Mesh.stop
        self.mesh._logs.append(log)
        started = time.monotonic()
        self.mesh.processes[stage] = subprocess.Popen(self.mesh.command(stage), stdout=log, stderr=log,
                                                      start_new_session=True,
                                                      env={**os.environ, **self.mesh.env})
        while health_status(self.address(stage)) != health_pb2.HealthCheckResponse.SERVING:
            if self.mesh.processes[stage].poll() is not None:
                raise RuntimeError(f"{stage} exited while restarting; see {self.log_dir}")
            if time.monotonic() - started > 240:
                raise RuntimeError(f"{stage} not SERVING 240 s after its restart")
            time.sleep(0.2)
        return time.monotonic() - started

    def rss_mb(self) -> dict[str, float]:
        return {stage: round(rss_mb(proc.pid), 1) for stage, proc in self.mesh.processes.items()}

    def jobs_in_flight(self) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=10) as answer:
            for line in answer.read().decode().splitlines():
                if line.startswith("t2v_gateway_jobs_in_flight "):
                    return float(line.split()[1])
        raise RuntimeError("the gateway's metrics have no t2v_gateway_jobs_in_flight")


# --- the load --------------------------------------------------------------------------------------------
@dataclass
class Tally:
    """What the clients saw; shared by every thread (under ``lock``)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    accepted: set[str] = field(default_factory=set)
    refused: Counter = field(default_factory=Counter)          # code -> count
    errors: list[str] = field(default_factory=list)            # anything a client did not expect

    def add(self, job_id: str = "", refused: str = "", error: str = "") -> None:
        with self.lock:
            if job_id:
                self.accepted.add(job_id)
            if refused:
                self.refused[refused] += 1
            if error and len(self.errors) < 50:
                self.errors.append(error)


def _params(rng: random.Random) -> generation_pb2.GenerationParams:
    return generation_pb2.GenerationParams(prompt=f"a red ball {rng.randrange(1000)}",
                                           num_inference_steps=rng.choice((2, 3, 4)), **SMALL)


def grpc_job(stub: gateway_pb2_grpc.GatewayStub, rng: random.Random, tally: Tally) -> str:
    try:
        return stub.SubmitJob(S.SubmitJobRequest(params=_params(rng)), timeout=30).job_id
    except grpc.RpcError as error:
        if error.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE):
            tally.add(refused=f"grpc {error.code().name}")
        else:
            tally.add(error=f"SubmitJob {error.code().name}: {error.details()}")
        return ""


def http_job(port: int, rng: random.Random, tally: Tally) -> str:
    p = _params(rng)
    body = json.dumps({"prompt": p.prompt, "size": "32x32", "num_frames": 2,
                       "num_inference_steps": p.num_inference_steps}).encode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/videos", data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return json.loads(answer.read())["id"]
    except urllib.error.HTTPError as error:
        with error:
            if error.code in (429, 503, 507):
                tally.add(refused=f"http {error.code}")
            else:
                tally.add(error=f"POST {error.code}: {error.read()[:200]!r}")
    except OSError as error:
        tally.add(error=f"POST: {error}")
    return ""


def client(mesh: SoakMesh, index: int, stop: threading.Event, tally: Tally) -> None:
    """One job at a time until ``stop``: submit (gRPC or HTTP by turns), then poll it to its end."""
    rng = random.Random(index)
    with grpc.insecure_channel(mesh.address()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        turn = index
        while not stop.is_set():
            turn += 1
            job_id = grpc_job(stub, rng, tally) if turn % 2 else http_job(mesh.http_port, rng, tally)
            if not job_id:
                stop.wait(1.0)
                continue
            tally.add(job_id=job_id)
            while not stop.is_set():
                try:
                    if stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10).status in TERMINAL:
                        break
                except grpc.RpcError:
                    pass                   # the gateway is busy or the flood is on: ask again
                stop.wait(0.5)


# --- the faults ------------------------------------------------------------------------------------------
def flood(mesh: SoakMesh, streams: int, tally: Tally) -> dict[str, Any]:
    """``streams`` Generate calls at once, each cancelled after 10 s; health and ListJobs timed meanwhile."""
    refused, opened = Counter(), []
    channel = grpc.insecure_channel(mesh.address())
    stub = gateway_pb2_grpc.GatewayStub(channel)
    rng = random.Random(streams)
    calls = [stub.Generate(S.GenerateRequest(params=_params(rng)), timeout=60) for _ in range(streams)]

    def drain(call: Any) -> None:
        try:
            for event in call:
                if event.job_id:
                    opened.append(event.job_id)
                    tally.add(job_id=event.job_id)
                    break
            for _ in call:
                pass
        except grpc.RpcError as error:
            refused[error.code().name] += 1

    threads = [threading.Thread(target=drain, args=(call,), daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    time.sleep(2.0)
    timings = {"health_s": [], "list_jobs_s": []}
    health = health_pb2_grpc.HealthStub(channel)
    for _ in range(5):
        started = time.monotonic()
        health.Check(health_pb2.HealthCheckRequest(), timeout=5)
        timings["health_s"].append(round(time.monotonic() - started, 3))
        started = time.monotonic()
        stub.ListJobs(S.ListJobsRequest(page_size=10), timeout=5)
        timings["list_jobs_s"].append(round(time.monotonic() - started, 3))
        time.sleep(1.0)
    time.sleep(3.0)
    for call in calls:
        call.cancel()
    for thread in threads:
        thread.join(10)
    channel.close()
    return {"streams": streams, "refused": dict(refused), "health_s_max": max(timings["health_s"]),
            "list_jobs_s_max": max(timings["list_jobs_s"])}


def fill_disk(disk: SmallDisk, mesh: SoakMesh, seconds: float) -> dict[str, Any]:
    if not disk.mounted:
        return {"skipped": f"no tmpfs: {disk.why_not}"}
    disk.fill()
    answers: Counter = Counter()
    with grpc.insecure_channel(mesh.address()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                stub.SubmitJob(S.SubmitJobRequest(params=_params(random.Random())), timeout=10)
                answers["accepted"] += 1
            except grpc.RpcError as error:
                answers[error.code().name] += 1
            time.sleep(1.0)
    disk.free()
    return {"submissions_while_full": dict(answers)}


# --- the run ---------------------------------------------------------------------------------------------
def run(minutes: float, fault_every: float, clients: int, max_streams: int, flood_streams: int,
        work: Path, model: str = DEFAULT_MODEL, say: Callable[[str], None] = print) -> dict[str, Any]:
    disk = SmallDisk(work / "disk")
    mesh = SoakMesh(work, disk.path / "state", max_streams, model)
    report: dict[str, Any] = {"host": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                       "load_avg_at_start": os.getloadavg()[0]},
                              "minutes": minutes, "fault_every_s": fault_every, "clients": clients,
                              "tmpfs": disk.mounted or disk.why_not, "faults": [], "rss_mb": []}
    tally, stop = Tally(), threading.Event()
    try:
        mesh.start()
        threads = [threading.Thread(target=client, args=(mesh, i, stop, tally), daemon=True) for i in range(clients)]
        for thread in threads:
            thread.start()
        started = time.monotonic()
        end = started + minutes * 60
        kinds = ["kill denoiser", "fill disk", "flood", "kill text_encoder", "fill disk", "flood", "kill decoder"]
        next_fault, next_sample, turn = started + fault_every, started, 0
        while time.monotonic() < end:
            now = time.monotonic()
            if now >= next_sample:
                report["rss_mb"].append({"t_s": round(now - started), **mesh.rss_mb()})
                next_sample += 60
            if now >= next_fault:
                kind = kinds[turn % len(kinds)]
                turn += 1
                at = round(now - started)
                if kind.startswith("kill"):
                    detail: dict[str, Any] = {"back_serving_s": round(mesh.kill_and_restart(kind.split()[1], 3.0), 1)}
                elif kind == "fill disk":
                    detail = fill_disk(disk, mesh, 20.0)
                else:
                    detail = flood(mesh, flood_streams, tally)
                report["faults"].append({"t_s": at, "fault": kind, **detail})
                say(f"{at:>5} s  {kind}: {detail}")
                next_fault = time.monotonic() + fault_every
            time.sleep(0.5)
        stop.set()
        for thread in threads:
            thread.join(30)
        report["rss_mb"].append({"t_s": round(time.monotonic() - started), **mesh.rss_mb()})
        report.update(settle(mesh, tally))
    finally:
        stop.set()
        mesh.stop()
        disk.close()
    return report


def settle(mesh: SoakMesh, tally: Tally, timeout: float = 180.0) -> dict[str, Any]:
    """Every accepted job terminal (waited for), one more job completes, no slot held."""
    with grpc.insecure_channel(mesh.address()) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        statuses: dict[str, int] = {}
        deadline = time.monotonic() + timeout
        pending = sorted(tally.accepted)
        while pending and time.monotonic() < deadline:
            for job_id in list(pending):
                try:
                    job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10)
                except grpc.RpcError:
                    continue
                statuses[job_id] = job.status
                if job.status in TERMINAL:
                    pending.remove(job_id)
            if pending:
                time.sleep(1.0)
        ends: Counter = Counter()
        for job_id in tally.accepted:
            job = stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10)
            ends[S.JobStatus.Name(job.status) + (f" {job.error.code}" if job.error.code else "")] += 1
        probe = stub.SubmitJob(S.SubmitJobRequest(params=_params(random.Random(7))), timeout=30).job_id
        probe_end = time.monotonic() + 60
        while stub.GetJob(S.GetJobRequest(job_id=probe), timeout=10).status not in TERMINAL:
            if time.monotonic() > probe_end:
                break
            time.sleep(0.5)
        probe_status = S.JobStatus.Name(stub.GetJob(S.GetJobRequest(job_id=probe), timeout=10).status)
    time.sleep(1.0)
    return {"accepted": len(tally.accepted), "not_terminal": pending, "ends": dict(ends),
            "refused": dict(tally.refused), "client_errors": tally.errors, "probe_job": probe_status,
            "jobs_in_flight_at_end": mesh.jobs_in_flight()}


def rss_growth(samples: list[dict[str, Any]]) -> dict[str, float]:
    """Each process's growth from its second sample (a minute in: warm) to its last, in MiB."""
    if len(samples) < 3:
        return {}
    first, last = samples[1], samples[-1]
    return {k: round(last[k] - first[k], 1) for k in first if k != "t_s"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--fault-every", type=float, default=150.0, help="seconds between faults")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--max-streams", type=int, default=16, help="the gateway's stream cap")
    parser.add_argument("--flood", type=int, default=40, help="Generate streams opened at once by a flood")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=None, help="write the report here as JSON")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="t2v-soak-") as work:
        report = run(args.minutes, args.fault_every, args.clients, args.max_streams, args.flood, Path(work),
                     args.model)
    report["rss_growth_mb"] = rss_growth(report["rss_mb"])
    text = json.dumps(report, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)
    good = not report["not_terminal"] and report["probe_job"] == "JOB_STATUS_COMPLETED" \
        and report["jobs_in_flight_at_end"] == 0 and not report["client_errors"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
