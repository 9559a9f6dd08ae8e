"""Calls the three stages in order for one job, over gRPC, and reports what happens as it goes.

Why a generator of plain events: the gateway's Generate streams them to a client today; a queue
and job store (SubmitJob / GetJob) can consume the same events without touching this module.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator, Union

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.errors import (Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted,
                                    ServiceError, Unavailable)
from services.common.logs import kv
from services.common.server import message_options
from services.gateway.validation import Params
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, gateway_pb2,
                    text_encoder_pb2, text_encoder_pb2_grpc)

log = logging.getLogger("gateway.orchestrator")

# Retry a stage call that found no server (a pod restarting) a few times before giving up.
_RETRY_SERVICE_CONFIG = json.dumps({"methodConfig": [{
    "name": [{"service": "t2v.v1.TextEncoder"}, {"service": "t2v.v1.Denoiser"}, {"service": "t2v.v1.Decoder"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


@dataclass(frozen=True)
class StageStarted:
    stage: int            # gateway_pb2.Stage value


@dataclass(frozen=True)
class Progress:
    step: int
    total: int
    timestep: int


@dataclass(frozen=True)
class Warning:  # noqa: A001 - a job warning, not the builtin
    text: str


@dataclass(frozen=True)
class Result:
    video: bytes
    mime_type: str
    num_frames: int
    height: int
    width: int
    frames: object | None = None   # float frames from the decoder, only when asked for (parity checks)


JobEvent = Union[StageStarted, Progress, Warning, Result]


@dataclass
class RunControl:
    """Lets another thread cancel a running job: the call in flight is cancelled at once."""

    cancelled: threading.Event = field(default_factory=threading.Event)
    _call: grpc.Future | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled.set()
            if self._call is not None:
                self._call.cancel()

    def track(self, call: grpc.Future | None) -> None:
        with self._lock:
            self._call = call
            if call is not None and self.cancelled.is_set():
                call.cancel()


@dataclass(frozen=True)
class StageAddresses:
    text_encoder: str
    denoiser: str
    decoder: str


_STAGE_NAMES = {gateway_pb2.STAGE_TEXT_ENCODER: "text_encoder", gateway_pb2.STAGE_DENOISER: "denoiser",
                gateway_pb2.STAGE_DECODER: "decoder"}


class Orchestrator:
    def __init__(self, addresses: StageAddresses, max_message_bytes: int, stage_timeout: float) -> None:
        self.addresses = addresses
        self.stage_timeout = stage_timeout
        options = message_options(max_message_bytes) + [
            ("grpc.service_config", _RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1),
            ("grpc.lb_policy_name", "round_robin")]
        self._channels = {name: grpc.insecure_channel(getattr(addresses, name), options=options)
                          for name in ("text_encoder", "denoiser", "decoder")}
        self.text_encoder = text_encoder_pb2_grpc.TextEncoderStub(self._channels["text_encoder"])
        self.denoiser = denoiser_pb2_grpc.DenoiserStub(self._channels["denoiser"])
        self.decoder = decoder_pb2_grpc.DecoderStub(self._channels["decoder"])

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def ready(self, timeout: float = 1.0) -> bool:
        """True when every stage answers grpc.health.v1 with SERVING (its model is loaded)."""
        for channel in self._channels.values():
            try:
                answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            except grpc.RpcError:
                return False
            if answer.status != health_pb2.HealthCheckResponse.SERVING:
                return False
        return True

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.stage_timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the job finished")
        return min(self.stage_timeout, remaining)

    def _stage_error(self, stage: int, error: grpc.RpcError, control: RunControl) -> ServiceError:
        name = _STAGE_NAMES[stage]
        address = getattr(self.addresses, name)
        code, details = error.code(), error.details() or ""
        if code == grpc.StatusCode.CANCELLED or control.cancelled.is_set():
            return Cancelled("the job was cancelled")
        if code == grpc.StatusCode.UNAVAILABLE:
            return Unavailable(f"the {name} stage at {address} is unavailable ({details}); "
                               "check that it is running")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"the {name} stage refused the request: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"the {name} stage is full: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceeded(f"the {name} stage at {address} did not finish in time")
        return ServiceError(f"the {name} stage failed ({code.name}): {details}")

    def run(self, job_id: str, params: Params, control: RunControl | None = None,
            deadline: float | None = None, return_frames: bool = False) -> Iterator[JobEvent]:
        """Encode, denoise, decode; yield events; the last one is the Result. Raises ServiceError."""
        control = control or RunControl()
        stage = gateway_pb2.STAGE_TEXT_ENCODER
        try:
            yield StageStarted(stage)
            prompts = [params.negative_prompt, params.prompt] if params.uses_guidance else [params.prompt]
            encoded = self.text_encoder.Encode(
                text_encoder_pb2.EncodeRequest(prompts=prompts, request_id=job_id), timeout=self._timeout(deadline))
            for which, info in zip(["negative_prompt", "prompt"][-len(prompts):], encoded.prompts):
                if info.truncated:
                    yield Warning(f"{which} has {info.num_tokens} tokens; the model reads 77, so this was "
                                  f"dropped: {info.dropped_text!r}")

            stage = gateway_pb2.STAGE_DENOISER
            yield StageStarted(stage)
            if control.cancelled.is_set():
                raise Cancelled("the job was cancelled")
            call = self.denoiser.Denoise(denoiser_pb2.DenoiseRequest(
                request_id=job_id, embeddings=encoded.embeddings, num_frames=params.num_frames,
                height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale, seed=params.seed, scheduler=params.scheduler),
                timeout=self._timeout(deadline))
            control.track(call)
            latents = None
            for event in call:
                if event.HasField("progress"):
                    p = event.progress
                    yield Progress(p.step, p.total_steps, p.timestep)
                else:
                    latents = event.latents
            control.track(None)
            if latents is None:
                raise ServiceError("the denoiser stage ended its stream without latents")

            stage = gateway_pb2.STAGE_DECODER
            yield StageStarted(stage)
            decoded = self.decoder.Decode(decoder_pb2.DecodeRequest(
                request_id=job_id, latents=latents, fps=params.fps, return_frames=return_frames),
                timeout=self._timeout(deadline))
        except grpc.RpcError as error:
            raise self._stage_error(stage, error, control) from None
        finally:
            control.track(None)
        log.info(kv("job_done", job_id=job_id, mp4_bytes=len(decoded.video)))
        yield Result(video=decoded.video, mime_type=decoded.mime_type, num_frames=decoded.num_frames,
                     height=decoded.height, width=decoded.width,
                     frames=decoded.frames if return_frames else None)
