"""Faults, with real parts only: services run as processes of their own, so SIGKILL, SIGSTOP and SIGTERM are
real; every socket is a loopback port chosen at run time; jobs live in real SQLite files.

- a replica of any stage killed mid-call: its job finishes on the other replica, the client sees the stage
  start over (a Warning, progress from step 1 again) instead of an error;
- the gateway killed with jobs queued and running: after a restart on the same state dir every job
  completes, once;
- a hung stage (SIGSTOP): the stage timeout fails the job with DEADLINE_EXCEEDED naming the stage and frees
  its slot;
- a stage down at start: the gateway reports NOT_SERVING for readiness, jobs wait (until their deadline),
  and it serves as soon as the stage is up;
- SIGTERM: a stage and the gateway finish their work in flight, hand back the rest, refuse new work.

docs/reliability.md ("Faults") has the figures these tests measure. Run: pytest tests/integration/test_faults.py
"""

from __future__ import annotations

import http.client
import json
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2

from t2v.v1 import denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc, generation_pb2
from services.common.config import ServerConfig
from services.common.server import GrpcServer
from tests.conftest import RunningStage, ServiceProcess, free_port, wait_for

pytestmark = pytest.mark.slow

S = gateway_pb2
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING
SMALL = dict(num_frames=1, height=32, width=32)       # explicit: the embedded model's default size may change
# What each stage logs, with the job id, when it handled a call.
HANDLED = {"text_encoder": "event=encoded job_id={}", "denoiser": "event=finished job_id={}",
           "decoder": "event=decoded job_id={}"}
FIGURES: dict[str, float] = {}                         # measured here; printed at the end (pytest -s)


def params(steps: int) -> generation_pb2.GenerationParams:
    return generation_pb2.GenerationParams(prompt="a red ball", num_inference_steps=steps, **SMALL)


class Follow:
    """A Generate stream followed on a thread: its events, as they come, with the time each came."""

    def __init__(self, stub: gateway_pb2_grpc.GatewayStub, steps: int, timeout: float = 180.0) -> None:
        self.events: list[tuple[float, gateway_pb2.GenerateEvent]] = []
        self.error: grpc.RpcError | None = None
        self.done = threading.Event()
        self.call = stub.Generate(S.GenerateRequest(params=params(steps)), timeout=timeout)
        threading.Thread(target=self._follow, daemon=True).start()

    def _follow(self) -> None:
        try:
            for event in self.call:
                self.events.append((time.monotonic(), event))
        except grpc.RpcError as error:
            self.error = error
        finally:
            self.done.set()

    @property
    def job_id(self) -> str:
        return self.events[0][1].job_id if self.events else ""

    def steps(self) -> list[int]:
        return [e.progress.step for _, e in self.events if e.HasField("progress")]

    def warnings(self) -> list[str]:
        return [w for _, e in self.events for w in e.warnings]

    def wait(self, timeout: float = 180.0) -> "Follow":
        assert self.done.wait(timeout), "the Generate stream did not end"
        assert self.error is None, f"{self.error.code().name}: {self.error.details()}"
        assert self.events[-1][1].HasField("result"), "the stream ended without a video"
        return self


class Jobs:
    """The job RPCs of a gateway at ``address``."""

    def __init__(self, address: str) -> None:
        self.stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address))

    def submit(self, steps: int, timeout_seconds: float = 0.0) -> gateway_pb2.Job:
        return self.stub.SubmitJob(S.SubmitJobRequest(params=params(steps), timeout_seconds=timeout_seconds),
                                   timeout=30)

    def get(self, job_id: str) -> gateway_pb2.Job:
        return self.stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=30)

    def wait(self, job_id: str, status: int, timeout: float = 120.0) -> gateway_pb2.Job:
        return wait_for(lambda: (job := self.get(job_id)).status == status and job, timeout,
                        f"job {job_id} to be {S.JobStatus.Name(status)}")

    def wait_step(self, job_id: str, step: int) -> gateway_pb2.Job:
        return wait_for(lambda: (job := self.get(job_id)).progress.step >= step and job, 120,
                        f"job {job_id} to run step {step}")


def replicas_target(replicas: list[ServiceProcess]) -> str:
    """One gRPC target for several replicas: the gateway's round_robin spreads calls over them."""
    return "ipv4:" + ",".join(r.address for r in replicas)


def started(*processes: ServiceProcess) -> list[ServiceProcess]:
    """Wait for processes started together (they load in parallel)."""
    return [p.wait_serving() for p in processes]


def unread_bytes(port: int) -> int:
    """Bytes that arrived on the connections accepted at ``port`` and that their process has not read yet
    (Linux's rx_queue): a call sent to a stopped process waits there."""
    total = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":     # ESTABLISHED
                total += int(fields[4].split(":")[1], 16)
    return total


def stage_addresses(*stages: RunningStage) -> list[str]:
    names = ("--text-encoder", "--denoiser", "--decoder")
    return [arg for name, stage in zip(names, stages) for arg in (name, stage.address)]


@pytest.fixture(scope="module", autouse=True)
def report_figures() -> Any:
    yield
    if FIGURES:
        print("\nfault figures: " + ", ".join(f"{k}={v:.2f}" for k, v in FIGURES.items()))


# --- a replica killed mid-call ------------------------------------------------------------------------------
def test_a_denoiser_replica_killed_mid_job_hands_it_to_the_other(spawn, gateway_factory) -> None:
    replicas = started(spawn("denoiser"), spawn("denoiser"))
    stub = gateway_pb2_grpc.GatewayStub(gateway_factory(denoiser=replicas_target(replicas), slots=2).channel())
    jobs = [Follow(stub, steps=40), Follow(stub, steps=40)]
    first = jobs[0]
    wait_for(lambda: len(first.steps()) >= 3, 60, "the first job to run 3 steps")
    victim = next(r for r in replicas if f"event=accepted job_id={first.job_id}" in r.log())
    survivor = next(r for r in replicas if r is not victim)
    killed_at = time.monotonic()
    victim.kill()                                                   # SIGKILL, mid-stream
    for job in jobs:
        job.wait()                                                  # every accepted job completes

    steps, warnings = first.steps(), first.warnings()
    assert len(warnings) == 1 and "denoiser stage failed during the call" in warnings[0]
    assert "attempt 2 of 3" in warnings[0] and "restarts from step 1" in warnings[0]
    warned = next(i for i, (_, e) in enumerate(first.events) if e.warnings)
    before = [e.progress.step for _, e in first.events[:warned] if e.HasField("progress")]
    after = [e.progress.step for _, e in first.events[warned:] if e.HasField("progress")]
    assert len(before) >= 3 and after == list(range(1, 41))       # progress starts over, to the end
    assert first.events[warned + 1][1].stage.stage == S.STAGE_DENOISER   # the stage starts again
    assert HANDLED["denoiser"].format(first.job_id) in survivor.log()
    assert HANDLED["denoiser"].format(first.job_id) not in victim.log()
    FIGURES["denoiser_kill_to_first_step_s"] = next(
        t for t, e in first.events[warned:] if e.HasField("progress")) - killed_at
    FIGURES["denoiser_kill_steps_lost"] = len(steps) - 40


@pytest.mark.parametrize("stage", ["text_encoder", "decoder"])
def test_a_replica_killed_during_a_call_hands_the_call_to_the_other(spawn, gateway_factory, stage) -> None:
    replicas = started(spawn(stage), spawn(stage))
    stub = gateway_pb2_grpc.GatewayStub(gateway_factory(**{stage: replicas_target(replicas)}, slots=2).channel())
    frozen, other = replicas
    warm = []                       # until both replicas have answered the gateway: both connected and healthy
    wait_for(lambda: warm.append(Follow(stub, steps=1).wait()) or all(
        any(HANDLED[stage].format(w.job_id) in r.log() for w in warm) for r in replicas), 60, "both replicas to work")

    frozen.signal(signal.SIGSTOP)   # the call that reaches it waits there, unanswered ...
    jobs = [Follow(stub, steps=2), Follow(stub, steps=2)]          # round_robin: one call each
    wait_for(lambda: unread_bytes(frozen.port) > 0 and sum(j.done.is_set() for j in jobs) == 1, 60,
             f"a call to reach the stopped {stage} replica while the other job completes")
    stuck = next(j for j in jobs if not j.done.is_set())
    killed_at = time.monotonic()
    frozen.kill()                   # ... until its replica dies: SIGKILL
    stuck.wait()
    assert HANDLED[stage].format(stuck.job_id) in other.log()      # it finished on the other replica
    FIGURES[f"{stage}_kill_to_done_s"] = stuck.events[-1][0] - killed_at
    # A unary call that died before any answer is retried by gRPC's retry policy, or else by the gateway,
    # which then says so; either way the client sees no error.
    FIGURES[f"{stage}_kill_gateway_retries"] = sum("trying again" in w for w in stuck.warnings())


class BreakingDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    """A denoiser replica that sends one step, then fails with ``code``, every time."""

    def __init__(self, code: grpc.StatusCode) -> None:
        self.code, self.calls = code, 0

    def Denoise(self, request: denoiser_pb2.DenoiseRequest, context: grpc.ServicerContext) -> Any:
        self.calls += 1
        yield denoiser_pb2.DenoiseEvent(progress=generation_pb2.StepProgress(step=1, total_steps=2))
        context.abort(self.code, "broken on purpose")


@pytest.mark.parametrize("code,calls", [(grpc.StatusCode.UNAVAILABLE, 3), (grpc.StatusCode.INVALID_ARGUMENT, 1),
                                        (grpc.StatusCode.INTERNAL, 1)])
def test_only_a_stage_that_went_away_is_tried_again_and_only_three_times(gateway_factory, code, calls) -> None:
    breaking = BreakingDenoiser(code)
    server = GrpcServer(ServerConfig(port=0), "t2v.v1.Denoiser",
                        lambda s: denoiser_pb2_grpc.add_DenoiserServicer_to_server(breaking, s))
    port = server.start()
    server.set_serving(True)
    try:
        stub = gateway_pb2_grpc.GatewayStub(gateway_factory(denoiser=f"127.0.0.1:{port}").channel())
        job = Follow(stub, steps=2)
        assert job.done.wait(60)
        assert job.error is not None and job.error.code() == code and "denoiser stage" in job.error.details()
        assert breaking.calls == calls and len(job.warnings()) == calls - 1
        assert job.steps() == [1] * calls                        # each try starts over
    finally:
        server.stop(0)


# --- the gateway killed -------------------------------------------------------------------------------------
def test_a_gateway_killed_with_jobs_queued_and_running_runs_each_once_after_a_restart(
        spawn, text_encoder_stage, denoiser_stage, decoder_stage, tmp_path) -> None:
    state = tmp_path / "state"
    args = [*stage_addresses(text_encoder_stage, denoiser_stage, decoder_stage), "--slots", "1",
            "--state-dir", str(state)]
    first = spawn("gateway", *args).wait_serving()
    client = Jobs(first.address)
    running = client.submit(steps=100)
    client.wait_step(running.job_id, 2)
    queued = [client.submit(steps=2), client.submit(steps=2)]
    assert [client.get(j.job_id).status for j in queued] == [S.JOB_STATUS_QUEUED] * 2
    first.kill()                                                   # SIGKILL: no drain, no goodbye
    assert first.proc.returncode == -signal.SIGKILL
    wait_for(lambda: denoiser_stage.servicer.engine.active_jobs() == 0, 30, "the denoiser to drop the dead call")

    restarted_at = time.monotonic()
    second = spawn("gateway", *args).wait_serving()
    client = Jobs(second.address)
    ids = sorted(j.job_id for j in [running, *queued])
    for job_id in ids:
        client.wait(job_id, S.JOB_STATUS_COMPLETED)
    FIGURES["gateway_restart_to_all_done_s"] = time.monotonic() - restarted_at
    listed = client.stub.ListJobs(S.ListJobsRequest(), timeout=30).jobs
    assert sorted(j.job_id for j in listed) == ids                 # none lost, none twice
    assert sorted(p.stem for p in (state / "results").glob("*.mp4")) == ids
    log = second.log()
    assert all(log.count(f"event=job_finished job_id={job_id}") == 1 for job_id in ids)
    assert "event=job_finished" not in first.log()
    assert re.search(rf"event=job_started job_id={running.job_id} .*run=2", log)   # the interrupted one again


# --- a hung stage -------------------------------------------------------------------------------------------
STAGE_TIMEOUT = 6.0


def test_a_hung_denoiser_hits_the_stage_timeout_and_frees_the_slot(spawn, gateway_factory) -> None:
    denoiser = spawn("denoiser").wait_serving()
    gateway = gateway_factory(denoiser=denoiser.address, slots=1, stage_timeout=STAGE_TIMEOUT)
    client = Jobs(gateway.address)
    Follow(gateway_pb2_grpc.GatewayStub(gateway.channel()), steps=1).wait()   # connected, and its first step done
    hung = client.submit(steps=60)                                 # ~1 s when nothing hangs
    client.wait_step(hung.job_id, 1)
    denoiser.signal(signal.SIGSTOP)                                # a real hang: the process does nothing
    stopped_at = time.monotonic()
    after = client.submit(steps=2)
    assert client.get(after.job_id).status == S.JOB_STATUS_QUEUED  # the hung job holds the only slot

    failed = client.wait(hung.job_id, S.JOB_STATUS_FAILED, timeout=STAGE_TIMEOUT + 60)
    FIGURES["hang_to_failed_s"] = time.monotonic() - stopped_at
    assert failed.error.code == "DEADLINE_EXCEEDED"
    assert "denoiser stage" in failed.error.message and f"stage timeout ({STAGE_TIMEOUT:g} s)" in failed.error.message
    assert failed.progress.step < 60
    client.wait(after.job_id, S.JOB_STATUS_RUNNING, timeout=30)   # the slot is free: the next job runs
    denoiser.signal(signal.SIGCONT)
    client.wait(after.job_id, S.JOB_STATUS_COMPLETED)


# --- a stage down at start ----------------------------------------------------------------------------------
def http_get(url: str) -> tuple[int, dict]:
    host, port = re.match(r"http://([^:/]+):(\d+)", url).groups()
    connection = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_a_stage_down_at_start_makes_jobs_wait_until_it_is_up(spawn, text_encoder_stage, decoder_stage,
                                                              tmp_path) -> None:
    denoiser_port = free_port()                                    # nothing listens there yet
    gateway = spawn("gateway", "--text-encoder", text_encoder_stage.address, "--denoiser",
                    f"127.0.0.1:{denoiser_port}", "--decoder", decoder_stage.address, "--http-port", "0",
                    "--state-dir", str(tmp_path / "state")).wait_serving()
    url = re.search(r"event=http_listening url=(\S+)", gateway.log()).group(1)
    assert gateway.health() == SERVING                             # alive: it takes jobs ...
    wait_for(lambda: gateway.health("t2v.v1.Gateway") == NOT_SERVING, 10, "readiness to say NOT_SERVING")
    assert http_get(url)[0] == 503                                 # ... but is not ready to run them

    client = Jobs(gateway.address)
    waiting = client.submit(steps=2, timeout_seconds=300)
    hasty = client.submit(steps=2, timeout_seconds=2)
    failed = client.wait(hasty.job_id, S.JOB_STATUS_FAILED, timeout=30)
    assert failed.error.code == "DEADLINE_EXCEEDED" and "denoiser stage" in failed.error.message
    assert client.get(waiting.job_id).status == S.JOB_STATUS_RUNNING     # waits in the stage, not failed

    denoiser = spawn("denoiser", port=denoiser_port).wait_serving()
    up_at = time.monotonic()
    wait_for(lambda: gateway.health("t2v.v1.Gateway") == SERVING, 30, "readiness to say SERVING")
    FIGURES["stage_up_to_gateway_ready_s"] = time.monotonic() - up_at
    client.wait(waiting.job_id, S.JOB_STATUS_COMPLETED, timeout=60)
    FIGURES["stage_up_to_waiting_job_done_s"] = time.monotonic() - up_at
    assert http_get(url) == (200, {"status": "serving"})
    assert HANDLED["denoiser"].format(waiting.job_id) in denoiser.log()


# --- graceful stop ------------------------------------------------------------------------------------------
def test_sigterm_on_a_denoiser_finishes_its_job_and_refuses_new_calls(spawn, gateway_factory) -> None:
    replicas = started(spawn("denoiser", "--grace-seconds", "60"), spawn("denoiser", "--grace-seconds", "60"))
    stub = gateway_pb2_grpc.GatewayStub(gateway_factory(denoiser=replicas_target(replicas), slots=2).channel())
    long = Follow(stub, steps=60)
    wait_for(lambda: len(long.steps()) >= 2, 60, "the job to run 2 steps")
    draining = next(r for r in replicas if f"event=accepted job_id={long.job_id}" in r.log())
    other = next(r for r in replicas if r is not draining)
    draining.signal(signal.SIGTERM)
    wait_for(lambda: draining.health() != SERVING, 10, "the replica to start draining")

    with pytest.raises(grpc.RpcError) as info:                     # new work is refused during the drain ...
        with grpc.insecure_channel(draining.address) as channel:
            next(denoiser_pb2_grpc.DenoiserStub(channel).Denoise(denoiser_pb2.DenoiseRequest(), timeout=10))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert draining.proc.poll() is None and HANDLED["denoiser"].format(long.job_id) not in draining.log()
    short = Follow(stub, steps=2).wait()                           # ... and goes to the other replica
    assert HANDLED["denoiser"].format(short.job_id) in other.log()

    long.wait()                                                    # the call in flight finished where it was
    assert long.warnings() == [] and long.steps() == list(range(1, 61))
    assert HANDLED["denoiser"].format(long.job_id) in draining.log()
    assert draining.proc.wait(timeout=60) == 0


def test_sigterm_on_the_gateway_finishes_the_running_job_and_hands_back_the_queued_one(
        spawn, text_encoder_stage, denoiser_stage, decoder_stage, tmp_path) -> None:
    args = [*stage_addresses(text_encoder_stage, denoiser_stage, decoder_stage), "--slots", "1",
            "--state-dir", str(tmp_path / "state"), "--grace-seconds", "60"]
    gateway = spawn("gateway", *args).wait_serving()
    stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(gateway.address))
    client = Jobs(gateway.address)
    running = Follow(stub, steps=100)
    wait_for(lambda: len(running.steps()) >= 2, 60, "the job to run 2 steps")
    queued = client.submit(steps=2)
    gateway.signal(signal.SIGTERM)
    wait_for(lambda: gateway.health() != SERVING, 10, "the gateway to start draining")

    with pytest.raises(grpc.RpcError) as info:                     # new work is refused during the drain
        client.submit(steps=2)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert gateway.proc.poll() is None and not running.done.is_set()
    running.wait()                                                 # the running job finished, streamed to its client
    assert gateway.proc.wait(timeout=60) == 0
    assert "event=job_started job_id=" + queued.job_id not in gateway.log()

    restarted = spawn("gateway", *args).wait_serving()             # the queued job was handed back
    client = Jobs(restarted.address)
    client.wait(queued.job_id, S.JOB_STATUS_COMPLETED)
    assert client.get(running.job_id).status == S.JOB_STATUS_COMPLETED
    assert f"event=job_started job_id={running.job_id}" not in restarted.log()   # not run twice
