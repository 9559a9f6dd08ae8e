"""A Denoise call that ends while its handler is still taking the request in: the job must not run on.

Why: the handler submits the job to the engine, then asks gRPC to cancel it when the call ends
(``context.add_callback``). A call that has already ended by then (its caller cancelled it, or its
deadline passed, while the handler waited for a thread or for the engine's lock) gets no callback:
gRPC answers False and never calls it. Such a job ran all its steps for nobody and held a denoiser slot
meanwhile; two `make test` runs saw a slot held past 30 s (tests/integration/test_gateway.py's client that
goes away, tests/integration/test_preview.py's teardown). Here the real server on a loopback port is made
to take the request in slowly (its engine's submit waits until the client has cancelled), which is the
race made certain."""

from __future__ import annotations

import threading
import time

import grpc
import pytest
import torch

from services.common.tensors import to_proto
from t2v.v1 import denoiser_pb2, denoiser_pb2_grpc
from tests.conftest import EMBEDDING_DIM, start_denoiser, stop_stage, wait_for

pytestmark = pytest.mark.slow

STEPS = 400                     # ~10 s or more on a CPU: far longer than the wait below


def test_a_call_that_ended_before_its_job_was_watched_cancels_the_job() -> None:
    stage = start_denoiser()
    engine = stage.servicer.engine
    submit, cancelled_by_client = engine.submit, threading.Event()

    def slow_submit(request):              # the real submit, then the handler waits until the call is gone
        job = submit(request)
        cancelled_by_client.wait(10)
        time.sleep(0.5)                    # the cancel reaches the server and ends the call there
        return job

    engine.submit = slow_submit
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{stage.port}")
        embeddings = torch.randn(2, 77, EMBEDDING_DIM, generator=torch.Generator().manual_seed(0))
        call = denoiser_pb2_grpc.DenoiserStub(channel).Denoise(denoiser_pb2.DenoiseRequest(
            request_id="gone-early", embeddings=to_proto(embeddings), num_frames=2, height=32, width=32,
            num_inference_steps=STEPS, guidance_scale=9.0, seed=1, scheduler="ddim"), timeout=60)
        wait_for(lambda: engine.active_jobs() == 1, 10, "the job to reach the engine")
        call.cancel()
        cancelled_by_client.set()
        wait_for(lambda: engine.active_jobs() == 0, 5, "the engine to drop the job of a call that had ended")
        assert engine.stats.steps < STEPS and engine.stats.cancelled == 1
        channel.close()
    finally:
        engine.submit = submit
        stop_stage(stage)
