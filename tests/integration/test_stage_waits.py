"""What a job says while its denoiser is gone, and what it keeps after a clean stop (issue 16).

Before: while the denoiser was down GetJob kept showing the last step as if the job moved, and a job
re-run after a clean stop of the whole mesh (``t2v up``: every service stopped at once) carried a
warning that the denoiser "failed during the call" for ever. Now a running job that waits for a stage
says so (``Job.waiting_for``, ``waiting_for`` over HTTP), and a stage failure seen while the gateway
itself stops is not kept with the job. The denoiser runs as a process of its own (SIGKILL)."""

from __future__ import annotations

import json
import time
import urllib.request
from pathlib import Path
from typing import Callable

import pytest

from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage, ServiceProcess, stop_gateway, wait_for

pytestmark = pytest.mark.slow

S = gateway_pb2
SMALL = dict(num_frames=2, height=32, width=32)


def submit(stub: gateway_pb2_grpc.GatewayStub, steps: int) -> str:
    params = generation_pb2.GenerationParams(prompt="a red ball", num_inference_steps=steps, **SMALL)
    return stub.SubmitJob(S.SubmitJobRequest(params=params), timeout=30).job_id


def job(stub: gateway_pb2_grpc.GatewayStub, job_id: str) -> gateway_pb2.Job:
    return stub.GetJob(S.GetJobRequest(job_id=job_id), timeout=10)


def test_a_job_whose_denoiser_went_away_says_it_waits_for_one(
        spawn: Callable[..., ServiceProcess], gateway_factory: Callable[..., RunningStage]) -> None:
    denoiser = spawn("denoiser").wait_serving()
    gateway = gateway_factory(denoiser=denoiser.address, http_port=0, max_steps=400)
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    job_id = submit(stub, steps=400)
    wait_for(lambda: job(stub, job_id).progress.step >= 3, 60, "the job to run 3 steps")
    assert job(stub, job_id).waiting_for == ""
    port = denoiser.port
    denoiser.kill()
    waiting = wait_for(lambda: (j := job(stub, job_id)).waiting_for and j, 30, "GetJob to say the job waits")
    assert waiting.status == S.JOB_STATUS_RUNNING and waiting.stage == S.STAGE_DENOISER
    assert "waits for a replica of the denoiser stage" in waiting.waiting_for
    step = waiting.progress.step
    time.sleep(1.0)
    assert job(stub, job_id).progress.step == step                # nothing moves meanwhile: it says why
    with urllib.request.urlopen(f"{gateway.http_url}/v1/videos/{job_id}", timeout=10) as answer:
        assert "denoiser stage" in json.loads(answer.read())["waiting_for"]
    spawn("denoiser", port=port).wait_serving()
    wait_for(lambda: job(stub, job_id).progress.step > step, 120, "the job to move again")
    assert job(stub, job_id).waiting_for == ""                    # moving again: nothing to explain
    stub.CancelJob(S.CancelJobRequest(job_id=job_id), timeout=30)


def test_a_job_rerun_after_a_clean_stop_of_everything_carries_no_stage_failure(
        spawn: Callable[..., ServiceProcess], gateway_factory: Callable[..., RunningStage], tmp_path: Path) -> None:
    denoiser = spawn("denoiser").wait_serving()
    state = str(tmp_path / "state")
    gateway = gateway_factory(denoiser=denoiser.address, state_dir=state, checkpoint_every=5)
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    job_id = submit(stub, steps=60)
    wait_for(lambda: job(stub, job_id).progress.step >= 8, 60, "the job to pass a checkpoint")
    gateway.servicer.gate.drain()               # t2v up's Ctrl-C: the gateway drains ...
    port = denoiser.port
    denoiser.kill()                             # ... while the stages stop under it
    time.sleep(1.0)                             # the run sees the denoiser go and tries again
    stop_gateway(gateway)

    spawn("denoiser", port=port).wait_serving()   # the mesh starts again on the same state dir
    again = gateway_factory(denoiser=f"127.0.0.1:{port}", state_dir=state)
    stub = gateway_pb2_grpc.GatewayStub(again.channel())
    done = wait_for(lambda: (j := job(stub, job_id)).status == S.JOB_STATUS_COMPLETED and j, 120,
                    "the job to complete after the restart")
    assert list(done.warnings) == [], done.warnings
