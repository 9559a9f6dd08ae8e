"""A bounded load against a local mesh: JOBS jobs from CLIENTS concurrent clients, gRPC (Generate) and
HTTP (POST /v1/videos, then its server-sent events) mixed, priorities mixed, into a gateway whose queue
is small enough that some submissions are refused. Prints throughput, latency by priority, refusals
and every process's resident memory (VmRSS) after a warm-up, after the first half of the load and
after the second.

Why a script beside the test: the same load, bigger, is how an operator sizes ``--slots`` and
``--max-queue`` on their own machine; ``tests/e2e/test_load.py`` runs it small and asserts on what it
returns, so the two cannot drift apart. The mesh runs as four real processes (``t2v.up.Mesh``) on
loopback ports chosen at run time, so each one's memory can be read from ``/proc/PID/status``.

A client that is refused waits the Retry-After it was given (a gRPC trailer, an HTTP header) and sends
the same job again, as a well-behaved client does; so every job is eventually accepted, and the
refusals are counted along the way.

    python bench/load.py                       # the test's load: 400 jobs, 50 clients, ~40 s on 2 cores
    python bench/load.py --jobs 1000 --clients 100 --max-queue 32 --frames 8 --size 128 --steps 4
"""

from __future__ import annotations

import argparse
import http.client
import itertools
import json
import math
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402

from services.common.config import DEFAULT_MODEL  # noqa: E402
from t2v.client import gateway_channel  # noqa: E402
from t2v.up import STAGES, Mesh, MeshPorts, free_port  # noqa: E402
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2  # noqa: E402

PRIORITIES = ("high", "normal", "low")
PROTO_PRIORITY = {"low": gateway_pb2.PRIORITY_LOW, "normal": gateway_pb2.PRIORITY_NORMAL,
                  "high": gateway_pb2.PRIORITY_HIGH}
LEVEL = {gateway_pb2.PRIORITY_LOW: 0, gateway_pb2.PRIORITY_NORMAL: 1, gateway_pb2.PRIORITY_HIGH: 2}
MAX_ATTEMPTS = 200           # a job refused this often is an error (the queue never drains)


# --- the mesh ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MeshSettings:
    """How the local mesh runs: a small queue so the load overflows it; no aging, so that the order
    check below is exact (aging is the queue's unit tests' business)."""

    slots: int = 4
    max_queue: int = 16
    aging_seconds: float = 0.0
    model: str = DEFAULT_MODEL
    start_timeout: float = 180.0
    # One torch thread per stage: three torch processes with a thread per core each oversubscribe a
    # 2-core machine; with anything else running there, throughput halves (docs/reliability.md, Load).
    torch_threads: int = 1


class LocalMesh:
    """``t2v.up.Mesh`` on free loopback ports, with the gateway's HTTP API on one more; logs and state in
    ``work_dir``. Use as a context manager: every process is stopped on exit, even after a failure."""

    def __init__(self, work_dir: Path, settings: MeshSettings = MeshSettings()) -> None:
        self.http_port = free_port()
        ports = MeshPorts(*(free_port() for _ in range(4)))
        gateway_args = [f"--http-port={self.http_port}", f"--slots={settings.slots}",
                        f"--max-queue={settings.max_queue}", f"--aging-seconds={settings.aging_seconds}"]
        self.mesh = Mesh("127.0.0.1", ports, settings.model, device="cpu", dtype="float32",
                         log_dir=work_dir / "logs", state_dir=work_dir / "state",
                         extra_args={"gateway": gateway_args}, metrics_offset=-1, http_offset=-1,
                         env={"OMP_NUM_THREADS": str(settings.torch_threads)} if settings.torch_threads else None)
        self.settings = settings

    def __enter__(self) -> "LocalMesh":
        try:
            self.mesh.start(timeout=self.settings.start_timeout, echo=sys.stderr)
        except BaseException:
            self.mesh.stop(grace=5.0)
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.mesh.stop(grace=10.0)

    @property
    def grpc_address(self) -> str:
        return self.mesh.address("gateway")

    @property
    def pids(self) -> dict[str, int]:
        return {stage: proc.pid for stage, proc in self.mesh.processes.items()}

    def rss_mb(self) -> dict[str, float]:
        """Each process's resident memory now, in MiB (VmRSS of /proc/PID/status)."""
        return {stage: rss_mb(pid) for stage, pid in self.pids.items()}

    def check_alive(self) -> None:
        for stage, proc in self.mesh.processes.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{stage} exited with code {proc.returncode}; see {self.mesh.log_dir}")

    def log_problems(self) -> list[str]:
        """Lines of the services' logs that report a failure (level=ERROR, a traceback): none under
        a load that only fills the queue."""
        assert self.mesh.log_dir is not None
        return [f"{path.stem}: {line}" for path in sorted(self.mesh.log_dir.glob("*.log"))
                for line in path.read_text(errors="replace").splitlines()
                if "level=ERROR" in line or line.startswith("Traceback")]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmRSS line")


# --- the load ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shape:
    """What every job asks for: tiny, so hundreds of jobs take a minute on a laptop's CPU. Sizes are
    explicit: the embedded model's default size is not this script's business."""

    frames: int = 2
    height: int = 64
    width: int = 64
    steps: int = 1
    guidance: float = 9.0


@dataclass(frozen=True)
class Job:
    index: int
    priority: str
    api: str                       # "grpc" or "http"


@dataclass(frozen=True)
class Refusal:
    api: str
    code: str                      # RESOURCE_EXHAUSTED or 429 (anything else is an error, not a refusal)
    retry_after: str | None        # the trailer / header as sent; None if missing


@dataclass
class Outcome:
    job: Job
    job_id: str = ""
    submitted: float = 0.0         # monotonic: when the accepted submission was sent
    finished: float = 0.0          # monotonic: when the client saw the job end
    completed: bool = False
    error: str = ""                # anything but completion (or a proper refusal, then a retry)
    refusals: list[Refusal] = field(default_factory=list)

    @property
    def latency(self) -> float:
        return self.finished - self.submitted


class _Refused(Exception):
    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.code)
        self.refusal = refusal


def plan(jobs: int, start: int = 0, seed: int = 0) -> list[Job]:
    """``jobs`` jobs, priorities in equal thirds (shuffled, seeded), every other job over HTTP."""
    rng = random.Random(seed + start)
    priorities = [PRIORITIES[i % 3] for i in range(jobs)]
    rng.shuffle(priorities)
    return [Job(start + i, priorities[i], "grpc" if i % 2 == 0 else "http") for i in range(jobs)]


def _prompt(job: Job) -> str:
    return f"load job {job.index}: a red ball bouncing on green grass"


class GrpcClient:
    """Generate: submit and follow in one streamed call; the result event carries the MP4."""

    def __init__(self, address: str, shape: Shape, timeout: float) -> None:
        self.channel = gateway_channel(address)
        self.stub = gateway_pb2_grpc.GatewayStub(self.channel)
        self.shape, self.timeout = shape, timeout

    def run(self, job: Job, outcome: Outcome) -> None:
        s = self.shape
        params = generation_pb2.GenerationParams(prompt=_prompt(job), num_frames=s.frames, height=s.height,
                                                 width=s.width, num_inference_steps=s.steps,
                                                 guidance_scale=s.guidance)
        outcome.submitted = time.monotonic()
        call = self.stub.Generate(gateway_pb2.GenerateRequest(params=params, priority=PROTO_PRIORITY[job.priority]),
                                  timeout=self.timeout)
        try:
            for event in call:
                outcome.job_id = outcome.job_id or event.job_id
                if event.WhichOneof("event") == "result":
                    outcome.completed = len(event.result.video) > 0
                    if not outcome.completed:
                        outcome.error = "the result carried an empty video"
        except grpc.RpcError as error:
            if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and not outcome.job_id:
                raise _Refused(Refusal("grpc", error.code().name,
                                       dict(error.trailing_metadata() or ()).get("retry-after"))) from None
            outcome.error = f"{error.code().name}: {error.details()}"
        outcome.finished = time.monotonic()
        if not outcome.completed and not outcome.error:
            outcome.error = "the stream ended without a result"

    def close(self) -> None:
        self.channel.close()


class HttpClient:
    """POST /v1/videos, then GET /v1/videos/{id}/events until ``completed`` (or ``failed``)."""

    def __init__(self, port: int, shape: Shape, timeout: float) -> None:
        self.port, self.shape, self.timeout = port, shape, timeout
        self.conn = self._connect()

    def _connect(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)

    def _request(self, method: str, path: str, body: bytes | None = None) -> http.client.HTTPResponse:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        for attempt in (1, 2):         # a kept-alive connection the server closed meanwhile: reconnect once
            try:
                self.conn.request(method, path, body=body, headers=headers)
                return self.conn.getresponse()
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                self.conn.close()
                self.conn = self._connect()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def run(self, job: Job, outcome: Outcome) -> None:
        s = self.shape
        body = json.dumps({"prompt": _prompt(job), "size": f"{s.width}x{s.height}", "num_frames": s.frames,
                           "num_inference_steps": s.steps, "guidance_scale": s.guidance,
                           "priority": job.priority}).encode()
        outcome.submitted = time.monotonic()
        response = self._request("POST", "/v1/videos", body)
        answer = response.read()
        if response.status == 429:
            raise _Refused(Refusal("http", "429", response.getheader("Retry-After")))
        if response.status != 200:
            outcome.error = f"POST /v1/videos answered {response.status}: {answer[:300]!r}"
            return
        outcome.job_id = json.loads(answer)["id"]
        response = self._request("GET", f"/v1/videos/{outcome.job_id}/events")
        if response.status != 200:
            outcome.error = f"GET .../events answered {response.status}: {response.read()[:300]!r}"
            return
        event = ""
        for raw in response:                               # server-sent events, line by line
            line = raw.decode().rstrip("\r\n")
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event in ("completed", "failed", "error"):
                outcome.finished = time.monotonic()
                data = json.loads(line.split(":", 1)[1])
                if event == "completed" and data.get("status") == "completed":
                    outcome.completed = True
                else:
                    outcome.error = f"event {event}: {json.dumps(data)[:300]}"
        response.close()
        if not outcome.completed and not outcome.error:
            outcome.error = "the event stream ended without completed or failed"
        if outcome.completed:              # and the MP4 is there to fetch
            response = self._request("GET", f"/v1/videos/{outcome.job_id}/content")
            video = response.read()
            if response.status != 200 or not video or len(video) != int(response.getheader("Content-Length", -1)):
                outcome.completed = False
                outcome.error = f"GET .../content answered {response.status} with {len(video)} bytes"

    def close(self) -> None:
        self.conn.close()


def _run_job(client: GrpcClient | HttpClient, job: Job) -> Outcome:
    outcome = Outcome(job)
    for _ in range(MAX_ATTEMPTS):
        try:
            client.run(job, outcome)
            return outcome
        except _Refused as refused:
            outcome.refusals.append(refused.refusal)
            try:
                delay = float(refused.refusal.retry_after or "")
            except ValueError:
                outcome.error = f"refused ({refused.refusal.code}) without a usable retry-after: " \
                                f"{refused.refusal.retry_after!r}"
                return outcome
            time.sleep(delay)       # the client does what it was told: come back after Retry-After
        except Exception as error:  # noqa: BLE001 - reported, never lost
            outcome.error = f"{type(error).__name__}: {error}"
            return outcome
    outcome.error = f"refused {MAX_ATTEMPTS} times in a row"
    return outcome


@dataclass
class LoadRun:
    outcomes: list[Outcome]
    seconds: float


def run_load(mesh: LocalMesh, jobs: list[Job], clients: int, shape: Shape = Shape(),
             timeout: float = 300.0) -> LoadRun:
    """Send ``jobs`` from ``clients`` threads and wait until every job has ended; raise if that takes
    more than ``timeout`` seconds (also each call's deadline). Each thread holds one gRPC channel and
    one HTTP connection and uses the one its job names."""
    pending: Iterator[Job] = iter(jobs)
    take = threading.Lock()
    outcomes: list[Outcome] = []

    def client() -> None:
        grpc_client = GrpcClient(mesh.grpc_address, shape, timeout)
        http_client = HttpClient(mesh.http_port, shape, timeout)
        try:
            while True:
                with take:
                    job = next(pending, None)
                if job is None:
                    return
                outcome = _run_job(grpc_client if job.api == "grpc" else http_client, job)
                with take:
                    outcomes.append(outcome)
        finally:
            grpc_client.close()
            http_client.close()

    started = time.monotonic()
    threads = [threading.Thread(target=client, name=f"load-client-{i}", daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, started + timeout - time.monotonic()))
        if thread.is_alive():
            raise RuntimeError(f"{len(jobs)} jobs not done after {timeout:.0f} s: a job hangs, or the machine "
                               f"is far slower than expected")
    return LoadRun(sorted(outcomes, key=lambda o: o.job.index), time.monotonic() - started)


# --- what the gateway recorded -----------------------------------------------------------------------
@dataclass(frozen=True)
class Row:
    job_id: str
    level: int                     # 0 low, 1 normal, 2 high
    status: str
    created_ms: int
    started_ms: int
    finished_ms: int
    video_size: int


def gateway_rows(address: str) -> list[Row]:
    """Every job the gateway knows (ListJobs, all pages)."""
    rows: list[Row] = []
    token = ""
    with gateway_channel(address) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        while True:
            page = stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=1000, page_token=token), timeout=60)
            rows += [Row(j.job_id, LEVEL.get(j.priority, 1), gateway_pb2.JobStatus.Name(j.status), j.created_unix_ms,
                         j.started_unix_ms, j.finished_unix_ms, j.video_size) for j in page.jobs]
            token = page.next_page_token
            if not token:
                return rows


@dataclass(frozen=True)
class OrderCheck:
    """Pairs of jobs of different priority that waited in the queue at the same time, those among
    them where the lower one started first (none, for a queue without aging), and how many of them
    the higher one also finished first (most: a job that starts first may still finish second when
    slots run side by side)."""

    pairs: int
    violations: list[tuple[Row, Row]]
    higher_finished_first: int
    contended: set[str]            # job ids in at least one such pair: the jobs that met a backed-up queue

    @property
    def higher_finished_first_share(self) -> float:
        return self.higher_finished_first / self.pairs if self.pairs else math.nan


def check_order(rows: list[Row]) -> OrderCheck:
    """The gateway starts a higher job before a lower one that waits with it. Exact from the rows alone:
    the gateway stamps created_ms (submit) and started_ms (dispatch) under one lock, so when
    ``high.created_ms < low.started_ms`` (whole milliseconds) the high job was queued before the low one
    left the queue, and with aging off it must not have left after it. Ties in the millisecond are
    allowed (they cannot be ordered from the rows)."""
    pairs, violations, ahead, contended = 0, [], 0, set()
    for a, b in itertools.permutations(rows, 2):
        if a.level <= b.level or not (a.started_ms and b.started_ms):
            continue
        if a.created_ms < b.started_ms and b.created_ms < a.started_ms:     # waited together
            pairs += 1
            contended |= {a.job_id, b.job_id}
            ahead += a.finished_ms < b.finished_ms
            if a.started_ms > b.started_ms:
                violations.append((a, b))
    return OrderCheck(pairs, violations, ahead, contended)


# --- figures -----------------------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def summary(run: LoadRun) -> dict[str, object]:
    """Throughput, latency by priority (the client's view: accepted submission to end), refusals."""
    done = [o for o in run.outcomes if o.completed]
    refusals = [r for o in run.outcomes for r in o.refusals]
    latency = {p: [o.latency for o in done if o.job.priority == p] for p in PRIORITIES}
    return {
        "jobs": len(run.outcomes), "completed": len(done), "errors": sum(1 for o in run.outcomes if o.error),
        "seconds": round(run.seconds, 1), "jobs_per_second": round(len(done) / run.seconds, 2),
        "refusals": {api: sum(1 for r in refusals if r.api == api) for api in ("grpc", "http")},
        "refusals_without_retry_after": sum(1 for r in refusals if not r.retry_after),
        "retry_after_seconds": sorted({r.retry_after for r in refusals if r.retry_after}, key=float),
        "latency_p50": {p: round(percentile(v, 50), 2) for p, v in latency.items()},
        "latency_p95": {p: round(percentile(v, 95), 2) for p, v in latency.items()},
    }


# --- the whole run -----------------------------------------------------------------------------------
@dataclass
class Report:
    warmup: LoadRun
    halves: list[LoadRun]
    rss: dict[str, dict[str, float]]        # "warm", "half1", "half2" -> process -> MiB
    rows: list[Row]
    order: OrderCheck
    log_problems: list[str]                 # ERROR lines and tracebacks in the services' logs

    def growth_mb(self, first: str = "half1", second: str = "half2") -> dict[str, float]:
        return {stage: self.rss[second][stage] - self.rss[first][stage] for stage in STAGES}

    def figures(self) -> dict[str, object]:
        both = LoadRun([o for h in self.halves for o in h.outcomes], sum(h.seconds for h in self.halves))
        return {"load": summary(both), "halves": [summary(h) for h in self.halves],
                "order": {"jobs_that_waited_with_another_priority": len(self.order.contended),
                          "pairs_waiting_together": self.order.pairs, "violations": len(self.order.violations),
                          "higher_finished_first_share": round(self.order.higher_finished_first_share, 3)},
                "rss_mib": {k: _rounded(d) for k, d in self.rss.items()},
                "rss_growth_second_half_mib": _rounded(self.growth_mb()),
                "log_problems": len(self.log_problems)}


def _rounded(values: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 1) for k, v in values.items()}


def run(mesh: LocalMesh, jobs: int, clients: int, shape: Shape = Shape(), warmup: int = 24,
        timeout: float = 300.0, seed: int = 0, echo: Callable[[str], None] = print) -> Report:
    """Warm up, then two halves of ``jobs``, reading every process's RSS after each; then the rows."""
    # Warm-up clients fit the gateway (slots + queue) with room to spare, so none is refused: a cold queue
    # has no departures yet to estimate its retry-after from, and says the default 30 s. Half of it: with
    # as many clients as places, one whose next job came before the gateway had freed the place of its
    # last was refused once in a full `make test` on 2 busy cores.
    capacity = mesh.settings.slots + mesh.settings.max_queue
    warm = run_load(mesh, plan(warmup, start=0, seed=seed), min(clients, warmup, max(1, capacity // 2)), shape,
                    timeout)
    mesh.check_alive()
    rss = {"warm": mesh.rss_mb()}
    echo(f"warm-up: {len(warm.outcomes)} jobs in {warm.seconds:.1f} s; RSS MiB {_rounded(rss['warm'])}")
    halves = []
    for name, start in (("half1", warmup), ("half2", warmup + jobs // 2)):
        half = run_load(mesh, plan(jobs // 2, start=start, seed=seed), clients, shape, timeout)
        mesh.check_alive()
        rss[name] = mesh.rss_mb()
        halves.append(half)
        echo(f"{name}: {summary(half)}; RSS MiB {_rounded(rss[name])}")
    rows = gateway_rows(mesh.grpc_address)
    return Report(warm, halves, rss, rows, check_order(rows), mesh.log_problems())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=400, help="jobs after the warm-up (two halves)")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients")
    parser.add_argument("--warmup", type=int, default=24, help="jobs before the first memory reading")
    parser.add_argument("--slots", type=int, default=MeshSettings.slots, help="the gateway's --slots")
    parser.add_argument("--max-queue", type=int, default=MeshSettings.max_queue, help="the gateway's --max-queue")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model folder")
    parser.add_argument("--frames", type=int, default=Shape.frames)
    parser.add_argument("--size", type=int, default=Shape.height,
                        help="height and width, a multiple of the model's VAE scale factor (8 for the embedded model)")
    parser.add_argument("--steps", type=int, default=Shape.steps)
    parser.add_argument("--guidance", type=float, default=Shape.guidance)
    parser.add_argument("--timeout", type=float, default=300.0, help="longest each part of the load may take")
    parser.add_argument("--torch-threads", type=int, default=MeshSettings.torch_threads,
                        help="OMP_NUM_THREADS of the stages (0 = torch's default: one per core)")
    parser.add_argument("--keep", type=Path, default=None, help="keep logs and the job database here")
    args = parser.parse_args(argv)
    shape = Shape(args.frames, args.size, args.size, args.steps, args.guidance)
    work = args.keep or Path(tempfile.mkdtemp(prefix="t2v-load-"))      # removed after a clean run
    settings = MeshSettings(slots=args.slots, max_queue=args.max_queue, model=args.model,
                            torch_threads=args.torch_threads)
    with LocalMesh(work, settings) as mesh:
        report = run(mesh, args.jobs, args.clients, shape, args.warmup, args.timeout,
                     echo=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report.figures(), indent=2))
    errors = [o for h in report.halves for o in h.outcomes if o.error]
    for outcome in errors[:10]:
        print(f"error: job {outcome.job.index} ({outcome.job.api}, {outcome.job.priority}): {outcome.error}",
              file=sys.stderr)
    for line in report.log_problems[:10]:
        print(f"log: {line}", file=sys.stderr)
    if errors or report.order.violations or report.log_problems:
        print(f"the services' logs are in {work / 'logs'}", file=sys.stderr)
        return 1
    if args.keep is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
