"""Several gateways on one job store, as real processes: the harness of tests/e2e/test_gateway_replicas.py
and bench/bench_gateway_store.py.

What it runs: the three stages once (``t2v serve text_encoder|denoiser|decoder`` on loopback ports chosen
at run time, each with ``/metrics``), and any number of gateways (``t2v serve gateway``) in front of them,
each with its own gRPC, HTTP and metrics ports, all on one ``--job-store`` URL (PostgreSQL, or SQLite for
one gateway). Every process is a child of its own session, so SIGKILL, SIGTERM and SIGSTOP are the real
signals; each start of a process logs to a file of its own under ``log_dir`` (``gateway-b.2.log`` is the
second start of gateway b), so a restarted gateway's log does not mix with its predecessor's.

Nothing here asserts; it raises :class:`HarnessError` with the relevant log tails when a bounded wait runs
out, and :meth:`Cluster.close` kills every process it started (also after a failure).
"""

from __future__ import annotations

import http.client
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import DEFAULT_MODEL
from t2v.up import free_port
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

S = gateway_pb2
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GATEWAY_SERVICE = "t2v.v1.Gateway"       # its health follows readiness: store healthy and stages SERVING
PRIORITY = {"low": S.PRIORITY_LOW, "normal": S.PRIORITY_NORMAL, "high": S.PRIORITY_HIGH}
LEVEL = {S.PRIORITY_LOW: 0, S.PRIORITY_NORMAL: 1, S.PRIORITY_HIGH: 2, S.PRIORITY_UNSPECIFIED: 1}
TERMINAL = {S.JOB_STATUS_COMPLETED, S.JOB_STATUS_FAILED, S.JOB_STATUS_CANCELLED, S.JOB_STATUS_EXPIRED}
STAGE_ARGS = ("--device", "cpu", "--dtype", "float32")
ROOT = Path(__file__).resolve().parent.parent

# The denoiser's /metrics (services/denoiser/metrics.py): a Counter "t2v_denoiser_steps" is exposed with
# Prometheus' "_total" suffix; it counts steps summed over requests (a batch of 3 counts 3).
DENOISER_STEPS = "t2v_denoiser_steps_total"
DENOISER_ACTIVE = "t2v_denoiser_active_requests"
GATEWAY_IN_FLIGHT = "t2v_gateway_jobs_in_flight"


class HarnessError(AssertionError):
    """A bounded wait ran out, or a process died; the message carries the log tails that say why."""


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, *,
               logs: Callable[[], str] | None = None, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned); else HarnessError naming ``what``,
    with ``logs()`` appended (the tails of the logs that matter)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise HarnessError(f"timed out after {timeout:g} s waiting for {what}" + (f"\n{logs()}" if logs else ""))
        time.sleep(interval)


def tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"--- {path.name}: (no log)"
    return f"--- last {min(lines, len(text))} lines of {path}:\n" + "\n".join(text[-lines:])


def scrape(url: str, timeout: float = 5.0) -> dict[str, float]:
    """A Prometheus text page as {series (name plus labels): value}."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            values[name] = float(value)
        except ValueError:
            continue
    return values


# --- processes ------------------------------------------------------------------------------------------
@dataclass
class Service:
    """One ``t2v serve NAME`` process (restartable on the same ports): ``start``, ``kill``, ``terminate``."""

    name: str                      # "denoiser", "gateway-a", ...
    kind: str                      # the t2v serve subcommand
    args: list[str]
    log_dir: Path
    port: int                      # gRPC
    metrics_port: int
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen | None = None
    starts: int = 0
    log_path: Path | None = None
    history: list[Path] = field(default_factory=list)    # every log this service wrote, oldest first

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "t2v", "serve", self.kind, "--host", "127.0.0.1", "--port", str(self.port),
                f"--metrics-port={self.metrics_port}", *(STAGE_ARGS if self.kind != "gateway" else ()), *self.args]

    def start(self) -> "Service":
        if self.alive:
            raise HarnessError(f"{self.name} is running already (pid {self.pid})")
        self.starts += 1
        self.log_path = self.log_dir / f"{self.name}.{self.starts}.log"
        self.history.append(self.log_path)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, cwd=ROOT,
                # one torch thread each: several processes share a small machine
                env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
                     "TOKENIZERS_PARALLELISM": "false", **self.env})
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def all_logs(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.history if path.exists())

    def tail(self, lines: int = 25) -> str:
        return tail(self.log_path, lines) if self.log_path else f"--- {self.name}: never started"

    def health(self, service: str = "", timeout: float = 1.0) -> int | None:
        """grpc.health.v1 status of ``service`` ("" = the server), or None when it does not answer."""
        try:
            with grpc.insecure_channel(self.address) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None

    def wait_serving(self, timeout: float = 120.0, service: str = "") -> "Service":
        """Until its health (of ``service``) is SERVING; HarnessError (with its log) if it exits or times out."""
        def serving() -> bool:
            if not self.alive:
                raise HarnessError(f"{self.name} exited with code {self.proc.returncode if self.proc else None} "
                                   f"while starting\n{self.tail(40)}")
            return self.health(service) == SERVING
        wait_until(serving, timeout, f"{self.name} to be SERVING{f' ({service})' if service else ''}",
                   logs=lambda: self.tail(40), interval=0.1)
        return self

    def metrics(self) -> dict[str, float]:
        return scrape(self.metrics_url)

    def metric(self, name: str, default: float = 0.0) -> float:
        return self.metrics().get(name, default)

    def signal(self, sig: int) -> None:
        if self.alive:
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL (the whole session: nothing it started survives) and reap; a no-op once it exited."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the exit (its code); SIGKILL and HarnessError if it takes longer."""
        assert self.proc is not None
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise HarnessError(f"{self.name} did not exit within {timeout:g} s of SIGTERM\n{self.tail()}") from None


class Gateway(Service):
    """A gateway process, with its own gRPC stub (one channel, kept across restarts: same port)."""

    http_port: int = 0
    _channel: grpc.Channel | None = None
    _stub: gateway_pb2_grpc.GatewayStub | None = None

    @property
    def stub(self) -> gateway_pb2_grpc.GatewayStub:
        if self._stub is None:
            self._channel = grpc.insecure_channel(self.address, options=[
                ("grpc.max_receive_message_length", 64 << 20), ("grpc.initial_reconnect_backoff_ms", 100),
                ("grpc.max_reconnect_backoff_ms", 500)])
            self._stub = gateway_pb2_grpc.GatewayStub(self._channel)
        return self._stub

    def close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def start(self) -> "Gateway":
        """Start (again): with a fresh channel, since one that saw the old process go may still be in its
        reconnect backoff and fail the first calls with 'connection refused'."""
        self.close_channel()
        super().start()
        return self

    def wait_ready(self, timeout: float = 120.0) -> "Gateway":
        """SERVING, and ready (``t2v.v1.Gateway``: the store answers and every stage is SERVING)."""
        self.wait_serving(timeout, GATEWAY_SERVICE)
        return self

    # --- the API ---------------------------------------------------------------------------------------
    def submit(self, params: generation_pb2.GenerationParams, priority: str = "normal",
               timeout: float = 15.0) -> gateway_pb2.Job:
        return self.stub.SubmitJob(S.SubmitJobRequest(params=params, priority=PRIORITY[priority]), timeout=timeout)

    def get(self, job_id: str, timeout: float = 10.0) -> gateway_pb2.Job:
        return self.stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=timeout)

    def cancel(self, job_id: str, timeout: float = 10.0) -> gateway_pb2.Job:
        return self.stub.CancelJob(S.CancelJobRequest(job_id=job_id), timeout=timeout)

    def list_all(self, status: int = S.JOB_STATUS_UNSPECIFIED, timeout: float = 30.0) -> list[gateway_pb2.Job]:
        """Every job of the store (ListJobs, all pages, newest first)."""
        jobs: list[gateway_pb2.Job] = []
        token = ""
        while True:
            page = self.stub.ListJobs(S.ListJobsRequest(status=status, page_size=1000, page_token=token),
                                      timeout=timeout)
            jobs += page.jobs
            token = page.next_page_token
            if not token:
                return jobs

    def video(self, job_id: str, timeout: float = 30.0) -> bytes:
        chunks = list(self.stub.GetVideo(S.GetVideoRequest(job_id=job_id), timeout=timeout))
        data = b"".join(c.data for c in chunks)
        if chunks and len(data) != chunks[0].total_size:
            raise HarnessError(f"GetVideo of {job_id} on {self.name} gave {len(data)} of {chunks[0].total_size} bytes")
        return data

    def wait_status(self, job_id: str, statuses: Iterable[int], timeout: float) -> gateway_pb2.Job:
        wanted = set(statuses)

        def reached() -> gateway_pb2.Job | None:
            try:
                job = self.get(job_id)
            except grpc.RpcError:
                return None
            return job if job.status in wanted else None
        return wait_until(reached, timeout, f"job {job_id} to be {'/'.join(S.JobStatus.Name(s) for s in wanted)} "
                          f"(GetJob on {self.name})", logs=lambda: self.tail())

    def healthz(self, timeout: float = 2.0) -> int | None:
        """The HTTP status of /healthz, or None when nothing answers."""
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
            conn.request("GET", "/healthz")
            status = conn.getresponse().status
            conn.close()
            return status
        except OSError:
            return None

    def sse_events(self, job_id: str, timeout: float = 60.0) -> list[tuple[str, dict[str, Any]]]:
        """GET /v1/videos/{id}/events until the stream ends: [(event, data), ...]."""
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)
        try:
            conn.request("GET", f"/v1/videos/{job_id}/events")
            response = conn.getresponse()
            if response.status != 200:
                raise HarnessError(f"GET /v1/videos/{job_id}/events on {self.name} answered {response.status}: "
                                   f"{response.read()[:300]!r}")
            events, name = [], ""
            for raw in response:
                line = raw.decode().rstrip("\r\n")
                if line.startswith("event:"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("data:"):
                    events.append((name, json.loads(line.split(":", 1)[1])))
            return events
        finally:
            conn.close()

    # --- what its logs say -------------------------------------------------------------------------------
    def started_jobs(self) -> list[str]:
        """Job ids this gateway (every start of it) logged ``job_started`` for, once per start of a run."""
        return re.findall(r"event=job_started job_id=([0-9a-f]{32})", self.all_logs())

    def ran(self, job_id: str) -> bool:
        return f"event=job_started job_id={job_id}" in self.log()


@dataclass(frozen=True)
class Shape:
    """What a tiny job asks for: explicit sizes, so the embedded model's defaults do not matter."""

    frames: int = 2
    size: int = 32
    steps: int = 8
    guidance: float = 9.0

    def params(self, prompt: str = "a red ball", steps: int | None = None, seed: int = 0) -> generation_pb2.GenerationParams:
        p = generation_pb2.GenerationParams(prompt=prompt, num_frames=self.frames, height=self.size, width=self.size,
                                            num_inference_steps=steps or self.steps, guidance_scale=self.guidance)
        if seed:
            p.seed = seed
        return p


class Cluster:
    """The three stages and any number of gateways on one job store. Use as a context manager (or call
    ``close``): every process it started is killed on the way out, whatever happened."""

    def __init__(self, log_dir: Path, job_store: str, *, model: str = DEFAULT_MODEL, denoiser_batch: int = 8,
                 gateway_args: Sequence[str] = (), stage_args: dict[str, Sequence[str]] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.job_store = job_store
        self.model = model
        self.gateway_args = list(gateway_args)
        extra = stage_args or {}
        self.stages = {name: Service(name, name, ["--model", model, *extra.get(name, ())], self.log_dir, free_port(),
                                     free_port())
                       for name in ("text_encoder", "denoiser", "decoder")}
        self.stages["denoiser"].args += [f"--max-batch={denoiser_batch}"]
        self.gateways: dict[str, Gateway] = {}
        self.sql: Callable[..., list[tuple[Any, ...]]] | None = None    # the job store's database, if the caller gives it
        self._lock = threading.Lock()

    @property
    def denoiser(self) -> Service:
        return self.stages["denoiser"]

    def start_stages(self, timeout: float = 180.0) -> "Cluster":
        for stage in self.stages.values():
            stage.start()
        for stage in self.stages.values():
            stage.wait_serving(timeout)
        return self

    def add_gateway(self, name: str, *args: str, job_store: str | None = None, start: bool = True) -> Gateway:
        """A gateway on the cluster's stages and job store (``args`` after the cluster's own gateway args, so
        they win); started, not waited for (``wait_ready``)."""
        store = self.job_store if job_store is None else job_store
        http_port = free_port()
        gateway = Gateway(name, "gateway", [
            "--model", self.model, "--text-encoder", self.stages["text_encoder"].address,
            "--denoiser", self.stages["denoiser"].address, "--decoder", self.stages["decoder"].address,
            f"--http-port={http_port}", *([f"--job-store={store}"] if store else []), *self.gateway_args, *args],
            self.log_dir, free_port(), free_port())
        gateway.http_port = http_port
        with self._lock:
            if name in self.gateways:
                raise HarnessError(f"a gateway named {name} exists already")
            self.gateways[name] = gateway
        return gateway.start() if start else gateway

    def steps_done(self) -> float:
        """Denoising steps the denoiser ran so far (summed over requests)."""
        return self.denoiser.metric(DENOISER_STEPS)

    def denoiser_active(self) -> float:
        return self.denoiser.metric(DENOISER_ACTIVE)

    def gateway_logs(self) -> str:
        return "\n".join(g.all_logs() for g in self.gateways.values())

    def tails(self, names: Iterable[str] | None = None, lines: int = 25) -> str:
        """The last lines of the current log of each named process (default: every gateway, then the stages)."""
        services: list[Service] = [*self.gateways.values(), *self.stages.values()]
        chosen = [s for s in services if names is None or s.name in set(names)]
        return "\n".join(s.tail(lines) for s in chosen)

    def problems(self) -> list[str]:
        """ERROR lines and tracebacks in every log written so far."""
        found = []
        for path in sorted(self.log_dir.glob("*.log")):
            for line in path.read_text(errors="replace").splitlines():
                if "level=ERROR" in line or line.startswith("Traceback"):
                    found.append(f"{path.name}: {line}")
        return found

    def close(self) -> None:
        """Kill every process started (gateways first), whatever state it is in."""
        for service in [*self.gateways.values(), *self.stages.values()]:
            try:
                if isinstance(service, Gateway):
                    service.close_channel()
                service.signal(signal.SIGCONT)       # a stopped process dies too
                service.kill()
            except Exception:  # noqa: BLE001 - kill the others all the same
                pass

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- clients ---------------------------------------------------------------------------------------------
@dataclass
class Follow:
    """A Generate stream read on a thread: its events as they come (with the wall time of each)."""

    gateway: Gateway
    request: gateway_pb2.GenerateRequest
    timeout: float = 120.0
    events: list[tuple[float, gateway_pb2.GenerateEvent]] = field(default_factory=list)
    error: grpc.RpcError | None = None
    done: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.call = self.gateway.stub.Generate(self.request, timeout=self.timeout)
        threading.Thread(target=self._read, name=f"follow-{self.gateway.name}", daemon=True).start()

    def _read(self) -> None:
        try:
            for event in self.call:
                self.events.append((time.time(), event))
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.done.set()

    @property
    def job_id(self) -> str:
        return self.events[0][1].job_id if self.events else ""

    def kinds(self) -> list[str]:
        return [str(e.WhichOneof("event")) for _, e in self.events]

    def steps(self) -> list[int]:
        return [e.progress.step for _, e in self.events if e.HasField("progress")]

    def result(self) -> gateway_pb2.VideoResult | None:
        for _, event in self.events:
            if event.HasField("result"):
                return event.result
        return None

    def cancel(self) -> None:
        self.call.cancel()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def iter_lines(paths: Iterable[Path]) -> Iterator[str]:
    for path in paths:
        if path.exists():
            yield from path.read_text(errors="replace").splitlines()
