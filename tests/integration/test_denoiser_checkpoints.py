"""Denoiser checkpoints through the real gRPC server on a loopback port: a Denoise stream cancelled after
a checkpoint, then a second Denoise resuming from it (kept as bytes in between, as a gateway keeps it),
ends with the latents of one uninterrupted Denoise; checkpoints that do not fit are refused."""

from __future__ import annotations

from typing import Callable

import grpc
import pytest
import torch

from services.common.tensors import from_proto, to_proto
from t2v.v1 import denoiser_pb2, denoiser_pb2_grpc, tensor_pb2
from tests.conftest import EMBEDDING_DIM, wait_for

pytestmark = pytest.mark.slow

STEPS = 6
SHAPE = [1, 4, 2, 4, 4]        # [1, C, num_frames, height/8, width/8] for 2 frames of 32x32


def denoise_request(scheduler: str, **overrides) -> denoiser_pb2.DenoiseRequest:
    embeddings = torch.randn(2, 77, EMBEDDING_DIM, generator=torch.Generator().manual_seed(3))
    fields = dict(request_id="ckpt", embeddings=to_proto(embeddings), num_frames=2, height=32, width=32,
                  num_inference_steps=STEPS, guidance_scale=9.0, seed=11, scheduler=scheduler)
    fields.update(overrides)
    return denoiser_pb2.DenoiseRequest(**fields)


def progress_steps(events: list[denoiser_pb2.DenoiseEvent]) -> list[int]:
    return [e.progress.step for e in events if e.HasField("progress")]


def checkpoints_follow_their_progress(events: list[denoiser_pb2.DenoiseEvent]) -> bool:
    return all(i > 0 and events[i - 1].progress.step == e.checkpoint.step
               for i, e in enumerate(events) if e.HasField("checkpoint"))


def first_checkpoint_then_cancel(stub: denoiser_pb2_grpc.DenoiserStub, request: denoiser_pb2.DenoiseRequest
                                 ) -> tuple[bytes, list[denoiser_pb2.DenoiseEvent]]:
    """Read the stream up to its first checkpoint, cancel it (a gateway dying), return the checkpoint's
    bytes (what the gateway stored) and the events seen."""
    call = stub.Denoise(request, timeout=120)
    seen = []
    for event in call:
        seen.append(event)
        if event.HasField("checkpoint"):
            call.cancel()
            return event.checkpoint.SerializeToString(), seen
    raise AssertionError(f"the stream ended without a checkpoint: {seen}")


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_a_denoise_resumed_from_a_checkpoint_ends_as_an_uninterrupted_one(denoiser_stage, scheduler):
    """(c) Each run has the engine to itself, so the latents can be compared exactly (batch-mates move
    them by float rounding on a CPU: tests/unit/test_engine_checkpoint.py)."""
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    engine = denoiser_stage.servicer.engine
    whole = list(stub.Denoise(denoise_request(scheduler), timeout=120))
    assert progress_steps(whole) == list(range(1, STEPS + 1))

    blob, seen = first_checkpoint_then_cancel(stub, denoise_request(scheduler, checkpoint_every=2))
    assert progress_steps(seen) == [1, 2] and checkpoints_follow_their_progress(seen)
    wait_for(lambda: engine.active_jobs() == 0, 30, "the denoiser to drop the cancelled request")

    checkpoint = denoiser_pb2.DenoiseCheckpoint.FromString(blob)
    assert (checkpoint.step, checkpoint.scheduler, checkpoint.num_inference_steps) == (2, scheduler, STEPS)
    assert list(checkpoint.latents.shape) == SHAPE and checkpoint.latents.dtype == tensor_pb2.DTYPE_FLOAT32
    assert len(checkpoint.model_outputs) == (2 if scheduler == "dpmsolver++" else 0)
    resumed = list(stub.Denoise(denoise_request(scheduler, checkpoint_every=2, resume=checkpoint), timeout=120))
    assert progress_steps(resumed) == [3, 4, 5, 6]
    assert [e.checkpoint.step for e in resumed if e.HasField("checkpoint")] == [4]     # never after the last
    assert checkpoints_follow_their_progress(resumed)
    assert all(e.progress.total_steps == STEPS for e in resumed if e.HasField("progress"))

    diff = float((from_proto(resumed[-1].latents) - from_proto(whole[-1].latents)).abs().max())
    print(f"\n{scheduler} through the server, resumed at step 2: max abs diff {diff}")
    assert diff <= 1e-5


def valid_checkpoint(scheduler: str, step: int = 3) -> denoiser_pb2.DenoiseCheckpoint:
    """A checkpoint that fits denoise_request(scheduler) (made up, not taken: its values do not matter)."""
    outputs = [to_proto(torch.randn(SHAPE)) for _ in range(min(step, 2))] if scheduler == "dpmsolver++" else []
    return denoiser_pb2.DenoiseCheckpoint(step=step, latents=to_proto(torch.randn(SHAPE)), scheduler=scheduler,
                                          num_inference_steps=STEPS, model_outputs=outputs,
                                          lower_order_nums=len(outputs))


def _set(**fields) -> Callable[[denoiser_pb2.DenoiseCheckpoint], None]:
    def mutate(checkpoint: denoiser_pb2.DenoiseCheckpoint) -> None:
        for name, value in fields.items():
            if isinstance(value, tensor_pb2.Tensor):
                getattr(checkpoint, name).CopyFrom(value)
            else:
                setattr(checkpoint, name, value)
    return mutate


def _outputs(*tensors: tensor_pb2.Tensor) -> Callable[[denoiser_pb2.DenoiseCheckpoint], None]:
    def mutate(checkpoint: denoiser_pb2.DenoiseCheckpoint) -> None:
        del checkpoint.model_outputs[:]
        checkpoint.model_outputs.extend(tensors)
    return mutate


GOOD = to_proto(torch.randn(SHAPE))


@pytest.mark.parametrize("scheduler,mutate,words", [
    ("ddim", _set(scheduler="dpmsolver++"), "resume with scheduler 'dpmsolver++'"),
    ("ddim", _set(num_inference_steps=50), "resume with num_inference_steps 50"),
    ("ddim", _set(step=0), "resume.step is 0; it must be between 1 and 5"),
    ("ddim", _set(step=STEPS), "resume.step is 6"),
    ("ddim", _set(latents=to_proto(torch.randn(1, 4, 3, 4, 4))), "resume.latents has shape [1, 4, 3, 4, 4]"),
    ("ddim", _set(latents=to_proto(torch.randn(1, 3, 2, 4, 4))), "make it [1, 4, 2, 4, 4]"),
    ("ddim", _set(latents=to_proto(torch.randn(SHAPE).half())), "resume.latents is float16; this denoiser computes "
                                                                "in float32"),
    ("ddim", _set(latents=to_proto(torch.full(SHAPE, float("nan")))), "resume.latents contains NaN"),
    ("ddim", _set(latents=tensor_pb2.Tensor(data=b"\0" * 8, shape=SHAPE, dtype=tensor_pb2.DTYPE_FLOAT32)), "bytes"),
    ("ddim", lambda c: c.ClearField("latents"), "resume.latents has dtype DTYPE_UNSPECIFIED"),
    ("ddim", _outputs(GOOD), "ddim after 3 steps keeps 0"),
    ("dpmsolver++", _outputs(GOOD), "resume carries 1 model outputs"),
    ("dpmsolver++", _set(lower_order_nums=1), "lower_order_nums 1"),
    ("dpmsolver++", _outputs(GOOD, to_proto(torch.randn(1, 4, 2, 4, 8))), "resume.model_outputs[1] has shape"),
    ("dpmsolver++", _outputs(GOOD, to_proto(torch.randn(SHAPE).bfloat16())), "resume.model_outputs[1] is bfloat16"),
])
def test_a_checkpoint_that_does_not_fit_the_request_is_refused(denoiser_stage, scheduler, mutate, words):
    """(d) INVALID_ARGUMENT with a sentence that says what to change, and the server keeps serving: a
    made-up checkpoint that fits is accepted (so each refusal is its mutation's)."""
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    bad = valid_checkpoint(scheduler)
    mutate(bad)
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Denoise(denoise_request(scheduler, num_inference_steps=STEPS, resume=bad), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert words in info.value.details()
    events = list(stub.Denoise(denoise_request(scheduler, resume=valid_checkpoint(scheduler, step=5)), timeout=30))
    assert progress_steps(events) == [6] and events[-1].HasField("latents")


def test_a_negative_checkpoint_every_is_refused(denoiser_stage):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    with pytest.raises(grpc.RpcError) as info:
        list(stub.Denoise(denoise_request("ddim", checkpoint_every=-1), timeout=30))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "checkpoint_every is -1; it must be 0 (no checkpoints) or a positive number of steps" in info.value.details()
