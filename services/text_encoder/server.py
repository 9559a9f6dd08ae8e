"""TextEncoder gRPC servicer: translates EncodeRequest <-> TextEncoder; no model logic here."""

from __future__ import annotations

import logging
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Sequence

import grpc

from services.common.config import ModelConfig, parse_config, setting
from services.common.errors import Cancelled, DeadlineExceeded, InvalidArgument, grpc_errors
from services.common.logs import kv
from services.common.model_folder import resolve_device, resolve_dtype
from services.common.server import ReadyGate, run_stage
from services.common.tracing import Tracing
from services.common.tensors import to_proto
from services.text_encoder.batcher import EncodeBatcher
from services.text_encoder.encoder import TextEncoder
from services.text_encoder.metrics import TextEncoderMetrics
from t2v.v1 import text_encoder_pb2, text_encoder_pb2_grpc

SERVICE_NAME = "t2v.v1.TextEncoder"
DEADLINE_PASSED = "the call's deadline passed while it waited for the text model"
MAX_BATCH_PROMPTS = 1024       # the batch-size histogram's last bucket; far past where a forward stops gaining
log = logging.getLogger("text_encoder")


@dataclass(frozen=True)
class TextEncoderConfig(ModelConfig):
    port: int = setting(50051, "port to listen on (0 = any free port)")
    max_prompts: int = setting(16, "most prompts in one Encode call")
    max_prompt_chars: int = setting(10_000, "longest prompt accepted, in characters")
    batch_prompts: int = setting(64, "most prompts in one forward: Encode calls that arrive while the model is "
                                     "busy share its next forward, up to this many prompts (1 = each call "
                                     "alone; at most 1024); a call that finds the model idle never waits")


def _wait_seconds(context: grpc.ServicerContext) -> float | None:
    """How long a call may wait for its forward: until its deadline; forever without one (gRPC reports
    "none" as about 1e9 s, more than a wait can be given)."""
    remaining = context.time_remaining()
    return remaining if remaining is not None and remaining < 1e6 else None


def _gone(context: grpc.ServicerContext) -> DeadlineExceeded | Cancelled:
    """Why a call ended before its answer: its deadline, or its client."""
    remaining = context.time_remaining()
    if remaining is not None and remaining <= 0:
        return DeadlineExceeded(DEADLINE_PASSED)
    return Cancelled("the call was cancelled before its prompts were encoded")


class TextEncoderServicer(text_encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, config: TextEncoderConfig) -> None:
        self.config = config
        self.gate = ReadyGate("text_encoder")
        if not 1 <= config.batch_prompts <= MAX_BATCH_PROMPTS:
            raise ValueError(f"--batch-prompts is {config.batch_prompts}; it must be 1 to {MAX_BATCH_PROMPTS}")
        if config.max_prompts < 1:
            raise ValueError(f"--max-prompts is {config.max_prompts}; it must be at least 1")
        self.metrics = TextEncoderMetrics()
        self.tracing = Tracing.for_service("t2v-text-encoder", config.otlp_endpoint)   # off unless an endpoint is set
        self.encoder: TextEncoder | None = None
        self.batcher: EncodeBatcher | None = None

    def load(self) -> None:
        device = resolve_device(self.config.device)
        self.encoder = TextEncoder(self.config.model, device, resolve_dtype(self.config.dtype, device))
        self.batcher = EncodeBatcher(self.encoder.encode, self.config.batch_prompts, self.metrics.batched,
                                     describe=self.encoder.report)

    def close(self, timeout: float) -> None:
        if self.batcher is not None:
            self.batcher.close(timeout)

    def _check(self, prompts: Sequence[str]) -> None:
        if not prompts:
            raise InvalidArgument("prompts is empty; send at least one prompt")
        if len(prompts) > self.config.max_prompts:
            raise InvalidArgument(f"{len(prompts)} prompts sent; at most {self.config.max_prompts} per call")
        for i, prompt in enumerate(prompts):
            if len(prompt) > self.config.max_prompt_chars:
                raise InvalidArgument(f"prompt {i} has {len(prompt)} characters; at most "
                                      f"{self.config.max_prompt_chars} are accepted (and only 77 tokens are used)")

    @grpc_errors
    def Encode(self, request: text_encoder_pb2.EncodeRequest, context: grpc.ServicerContext
               ) -> text_encoder_pb2.EncodeResponse:
        self.gate.check()
        prompts = list(request.prompts)
        self._check(prompts)
        assert self.encoder is not None and self.batcher is not None
        if not context.is_active():                           # it ended before this handler ran: no work for nobody
            raise _gone(context)
        pending = self.batcher.submit(prompts, alive=context.is_active)
        if not context.add_callback(pending.cancel):          # False: the call has already ended
            pending.cancel()
        try:
            encoded = pending.result(timeout=_wait_seconds(context))      # on the CPU: the GPU work is done
        except FutureTimeout:
            pending.cancel()                                  # not encoded later for nobody
            raise DeadlineExceeded(DEADLINE_PASSED) from None
        except CancelledError:
            raise _gone(context) from None
        if not context.is_active():
            raise _gone(context)
        reports = encoded.reports
        self.metrics.encoded(len(prompts), sum(r.truncated for r in reports))
        log.info(kv("encoded", job_id=request.request_id, prompts=len(prompts),
                    truncated=sum(r.truncated for r in reports), batch_prompts=encoded.batch_prompts))
        return text_encoder_pb2.EncodeResponse(
            embeddings=to_proto(encoded.embeddings),
            prompts=[text_encoder_pb2.PromptInfo(num_tokens=r.num_tokens, truncated=r.truncated,
                                                 dropped_text=r.dropped_text) for r in reports])


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(TextEncoderConfig, argv, "t2v serve text_encoder",
                          "CLIP text encoder stage: prompts -> embeddings over gRPC.")
    run_stage(config, "text_encoder", SERVICE_NAME, TextEncoderServicer, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server)
