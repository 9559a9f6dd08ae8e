"""The gateway over gRPC, in front of real stage servers: a video, bad input, a stage down, cancel."""

from __future__ import annotations

import io
import threading
import time

import av
import grpc
import pytest

from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import DEFAULT_SIZE, free_port, start_gateway, stop_gateway, wait_for

pytestmark = pytest.mark.slow


def generate(stage, timeout=120, **fields):
    stub = gateway_pb2_grpc.GatewayStub(stage.channel())
    return stub.Generate(gateway_pb2.GenerateRequest(params=generation_pb2.GenerationParams(**fields)),
                         timeout=timeout)


def test_generate_streams_stages_steps_then_an_mp4(gateway_stage):
    events = list(generate(gateway_stage, prompt="a red ball", num_frames=6, height=64, width=48,
                           num_inference_steps=5, seed=7, fps=10))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds == ["stage", "stage", "progress", "progress", "progress", "progress", "progress", "stage", "result"]
    assert [e.stage.stage for e in events if e.HasField("stage")] == [
        gateway_pb2.STAGE_TEXT_ENCODER, gateway_pb2.STAGE_DENOISER, gateway_pb2.STAGE_DECODER]
    assert len({e.job_id for e in events}) == 1
    result = events[-1].result
    assert (result.seed, result.num_frames, result.width, result.height, result.fps) == (7, 6, 48, 64, 10)
    assert result.guidance_scale == 9.0 and result.scheduler == "ddim" and result.num_inference_steps == 5
    with av.open(io.BytesIO(result.video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 6


def test_defaults_follow_diffusers_and_the_model(gateway_stage):
    result = list(generate(gateway_stage, prompt="a cat", num_inference_steps=1))[-1].result
    assert (result.num_frames, result.height, result.width, result.fps) == (16, DEFAULT_SIZE, DEFAULT_SIZE, 8)
    assert result.guidance_scale == 9.0


def test_a_long_prompt_is_truncated_with_a_warning(gateway_stage):
    events = list(generate(gateway_stage, prompt="a red ball bouncing " * 30, num_frames=1, height=32, width=32,
                           num_inference_steps=1))
    warnings = [w for e in events for w in e.warnings]
    assert len(warnings) == 1 and "77" in warnings[0] and "prompt" in warnings[0]


@pytest.mark.parametrize("fields,words", [
    ({"prompt": ""}, "prompt is empty"),
    ({"prompt": "   \n\t"}, "prompt is empty"),
    ({"prompt": "x", "num_frames": -1}, "num_frames"),
    ({"prompt": "x", "num_frames": 1000}, "num_frames"),
    ({"prompt": "x", "height": 30}, "multiple of 8"),
    ({"prompt": "x", "width": 4096}, "width"),
    ({"prompt": "x", "num_inference_steps": 100000}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": -2.0}, "guidance_scale"),
    ({"prompt": "x", "scheduler": "karras"}, "scheduler"),
    ({"prompt": "x", "cache": "turbo"}, "cache 'turbo' is unknown"),
])
def test_bad_input_is_refused_with_a_sentence_and_the_gateway_keeps_serving(gateway_stage, fields, words):
    with pytest.raises(grpc.RpcError) as info:
        list(generate(gateway_stage, **fields))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    assert list(generate(gateway_stage, prompt="ok", num_frames=1, height=32, width=32,
                         num_inference_steps=1))[-1].HasField("result")


@pytest.mark.parametrize("down", ["text_encoder", "denoiser", "decoder"])
def test_a_job_waits_for_a_stage_that_is_down_until_its_deadline_naming_it(text_encoder_stage, denoiser_stage,
                                                                           decoder_stage, down):
    addresses = {"text_encoder": text_encoder_stage.address, "denoiser": denoiser_stage.address,
                 "decoder": decoder_stage.address}
    addresses[down] = f"127.0.0.1:{free_port()}"     # nothing listens there
    gateway = start_gateway(**addresses)
    try:
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            list(generate(gateway, timeout=2.0, prompt="x", num_frames=1, height=32, width=32, num_inference_steps=1))
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started >= 1.9
        stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
        job = wait_for(lambda: (j := stub.ListJobs(gateway_pb2.ListJobsRequest(), timeout=10).jobs[0]).status
                       == gateway_pb2.JOB_STATUS_FAILED and j, 10, "the job to fail at its deadline")
        assert job.error.code == "DEADLINE_EXCEEDED" and f"{down} stage" in job.error.message
    finally:
        stop_gateway(gateway)


def test_a_client_that_goes_away_stops_the_denoiser_early(gateway_stage, denoiser_stage):
    engine = denoiser_stage.servicer.engine
    steps_before = engine.stats.steps
    call = generate(gateway_stage, prompt="a long job", num_frames=2, height=32, width=32, num_inference_steps=200)
    for event in call:
        if event.HasField("progress") and event.progress.step >= 2:
            call.cancel()
            break
    deadline = time.monotonic() + 30
    while engine.active_jobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active_jobs() == 0, "the cancelled job still holds a denoiser slot"
    assert engine.stats.steps - steps_before < 200
    # The slot is free: the next job runs to the end.
    assert list(generate(gateway_stage, prompt="next", num_frames=1, height=32, width=32,
                         num_inference_steps=2))[-1].HasField("result")


def test_a_deadline_covers_the_whole_job(gateway_stage, denoiser_stage):
    with pytest.raises(grpc.RpcError) as info:
        list(generate(gateway_stage, timeout=1.0, prompt="slow", num_frames=2, height=32, width=32,
                      num_inference_steps=200))
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    engine = denoiser_stage.servicer.engine
    deadline = time.monotonic() + 30
    while engine.active_jobs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.active_jobs() == 0, "the expired job still holds a denoiser slot"


def test_concurrent_requests_are_batched_in_the_denoiser(gateway_stage, denoiser_stage):
    engine = denoiser_stage.servicer.engine
    engine.stats.max_batch_seen = 0
    results = []

    def one(seed):
        results.append(list(generate(gateway_stage, prompt="batch", num_frames=2, height=32, width=32,
                                     num_inference_steps=30, seed=seed))[-1].result)
    threads = [threading.Thread(target=one, args=(s,)) for s in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 3
    assert engine.stats.max_batch_seen >= 2
