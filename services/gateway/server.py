"""Gateway gRPC servicer: the public front door. Validates, runs the job, streams its events.

The queue, job store, HTTP bridge and metrics plug in here: Generate already turns the
orchestrator's plain events into GenerateEvents, so a queued job is the same events, later.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import grpc

from services.common.config import DEFAULT_MODEL, ServerConfig, parse_config, setting
from services.common.errors import grpc_errors
from services.common.logs import kv
from services.common.server import ReadyGate, serve
from services.gateway import orchestrator as orch
from services.gateway.validation import Limits, Params, validate
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

SERVICE_NAME = "t2v.v1.Gateway"
log = logging.getLogger("gateway")


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    port: int = setting(50050, "port to listen on (0 = any free port)")
    text_encoder: str = setting("127.0.0.1:50051", "text_encoder stage address (host:port or dns:///name:port)")
    denoiser: str = setting("127.0.0.1:50052", "denoiser stage address")
    decoder: str = setting("127.0.0.1:50053", "decoder stage address")
    model: str = setting(DEFAULT_MODEL, "model folder; the gateway reads only unet/config.json for the default size")
    default_size: int = setting(0, "height and width when a request leaves them 0 (0 = the model's sample_size*8)")
    stage_timeout: float = setting(600.0, "longest a single stage call may take, in seconds")
    max_frames: int = setting(64, "largest num_frames accepted")
    max_size: int = setting(1024, "largest height or width accepted")
    max_steps: int = setting(200, "largest num_inference_steps accepted")
    max_prompt_chars: int = setting(10_000, "longest prompt accepted, in characters")


def model_default_size(model: str) -> int:
    """The pipeline's default height/width: unet sample_size * 8 (256 for text-to-video-ms-1.7b)."""
    config = Path(model) / "unet" / "config.json"
    if not config.is_file():
        return 256
    return int(json.loads(config.read_text()).get("sample_size", 32)) * 8


def limits_from(config: GatewayConfig) -> Limits:
    return Limits(max_frames=config.max_frames, max_size=config.max_size, max_steps=config.max_steps,
                  max_prompt_chars=config.max_prompt_chars,
                  default_size=config.default_size or model_default_size(config.model))


def result_message(result: orch.Result, params: Params) -> gateway_pb2.VideoResult:
    return gateway_pb2.VideoResult(
        video=result.video, mime_type=result.mime_type, seed=params.seed, num_frames=result.num_frames,
        height=result.height, width=result.width, fps=params.fps, num_inference_steps=params.num_inference_steps,
        guidance_scale=params.guidance_scale, scheduler=params.scheduler)


def to_message(job_id: str, event: orch.JobEvent, params: Params) -> gateway_pb2.GenerateEvent:
    if isinstance(event, orch.StageStarted):
        return gateway_pb2.GenerateEvent(job_id=job_id, stage=gateway_pb2.StageStarted(stage=event.stage))
    if isinstance(event, orch.Progress):
        return gateway_pb2.GenerateEvent(job_id=job_id, progress=generation_pb2.StepProgress(
            step=event.step, total_steps=event.total, timestep=event.timestep))
    if isinstance(event, orch.Warning):
        return gateway_pb2.GenerateEvent(job_id=job_id, warnings=[event.text])
    return gateway_pb2.GenerateEvent(job_id=job_id, result=result_message(event, params))


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig) -> None:
        self.config = config
        self.gate = ReadyGate("gateway")
        self.limits = limits_from(config)
        self.orchestrator: orch.Orchestrator | None = None

    def load(self) -> None:
        self.orchestrator = orch.Orchestrator(
            orch.StageAddresses(self.config.text_encoder, self.config.denoiser, self.config.decoder),
            self.config.max_message_bytes, self.config.stage_timeout)

    @grpc_errors
    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[gateway_pb2.GenerateEvent]:
        self.gate.check()
        params = validate(request.params, self.limits)
        assert self.orchestrator is not None
        job_id = uuid.uuid4().hex
        remaining = context.time_remaining()
        deadline = time.monotonic() + remaining if remaining is not None else None
        control = orch.RunControl()
        context.add_callback(control.cancel)
        log.info(kv("job_accepted", job_id=job_id, frames=params.num_frames, height=params.height,
                    width=params.width, steps=params.num_inference_steps, seed=params.seed))
        started = time.monotonic()
        for event in self.orchestrator.run(job_id, params, control, deadline):
            yield to_message(job_id, event, params)
        log.info(kv("job_completed", job_id=job_id, seconds=round(time.monotonic() - started, 3)))


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(GatewayConfig, argv, "t2v serve gateway",
                          "Public gateway: validates requests and runs them through the three stages.")
    servicer = GatewayServicer(config)
    serve(config, "gateway", SERVICE_NAME, servicer, servicer.gate,
          lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server))
