"""Calls the three stages in order for one job, over gRPC, and reports what happens as it goes.

Why a generator of plain events (``domain.RunEvent``): the job service consumes them (stores progress,
checkpoints, tells watchers) without knowing gRPC, and this module knows nothing of jobs or stores.
A run may start from a denoiser checkpoint (``resume``: the opaque bytes of a ``DenoiseCheckpoint``),
which is how a job taken over from a gateway that died goes on where it was.

With tracing on, each stage call is a CLIENT span (``t2v.v1.Denoiser/Denoise``, ...) under the current span
(the job's, which ``jobs.JobService`` makes current in the worker's thread), covering every attempt; its
``traceparent`` goes with each attempt as gRPC metadata, so the stage's SERVER span is its child. Retries,
checkpoints and a resume are events of that span.
"""

from __future__ import annotations

import inspect
import json
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Generator, Iterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from services.common.errors import (Cancelled, DeadlineExceeded, InvalidArgument, ResourceExhausted,
                                    ServiceError, Unavailable)
from services.common.logs import kv
from services.common.server import message_options
from services.common.tls import ClientTls, channel as tls_channel
from services.common.tracing import JOB_ID, Tracing, rpc_attributes, span_name
from services.gateway.domain import (Checkpoint, Params, Preview, Progress, Result, RunControl, RunEvent, Stage,
                                     StageRetried, StageStarted, Waiting, Warning)
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2,
                    text_encoder_pb2_grpc)

log = logging.getLogger("gateway.orchestrator")

# Retry a stage call that found no server (a pod restarting) a few times before giving up. The health
# check makes round_robin send calls only to replicas whose grpc.health.v1 says SERVING: not to one still
# loading its model, nor to one draining after SIGTERM.
_RETRY_SERVICE_CONFIG = json.dumps({"healthCheckConfig": {"serviceName": ""}, "methodConfig": [{
    "name": [{"service": "t2v.v1.TextEncoder"}, {"service": "t2v.v1.Denoiser"}, {"service": "t2v.v1.Decoder"}],
    "retryPolicy": {"maxAttempts": 3, "initialBackoff": "0.2s", "maxBackoff": "1s", "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"]},
}]})


# A stage call that breaks after it started (its replica killed or stopped mid-call: UNAVAILABLE) is not
# retried by gRPC's policy above, so ``Orchestrator.run`` tries it again itself, this many times in all.
STAGE_ATTEMPTS = 3
RETRY_BACKOFF_SECONDS = 0.25         # before the second try; doubled before each next one
# A stage that is down is found again this soon after it comes back (gRPC's default backs off to 120 s).
_MAX_RECONNECT_BACKOFF_MS = 2000
# The gRPC method of each stage call: its span's name and rpc.* attributes.
_METHODS = {Stage.TEXT_ENCODER: "/t2v.v1.TextEncoder/Encode", Stage.DENOISER: "/t2v.v1.Denoiser/Denoise",
            Stage.DECODER: "/t2v.v1.Decoder/Decode"}


@dataclass(frozen=True)
class StageAddresses:
    text_encoder: str
    denoiser: str
    decoder: str


class Orchestrator:
    def __init__(self, addresses: StageAddresses, max_message_bytes: int, stage_timeout: float,
                 tls: ClientTls | None = None, tracing: Tracing | None = None) -> None:
        self.addresses = addresses
        self.stage_timeout = stage_timeout
        self.tracing = tracing or Tracing.off()
        options = message_options(max_message_bytes) + [
            ("grpc.service_config", _RETRY_SERVICE_CONFIG), ("grpc.enable_retries", 1),
            ("grpc.lb_policy_name", "round_robin"), ("grpc.max_reconnect_backoff_ms", _MAX_RECONNECT_BACKOFF_MS)]
        # tls: the stages' CA and the gateway's client certificate (--stage-tls-*); None = plaintext
        self._channels = {name: tls_channel(getattr(addresses, name), tls, options)
                          for name in ("text_encoder", "denoiser", "decoder")}
        self.text_encoder = text_encoder_pb2_grpc.TextEncoderStub(self._channels["text_encoder"])
        self.denoiser = denoiser_pb2_grpc.DenoiserStub(self._channels["denoiser"])
        self.decoder = decoder_pb2_grpc.DecoderStub(self._channels["decoder"])

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()

    def _stage_serving(self, name: str, timeout: float) -> bool:
        """True when a replica of stage ``name`` answers grpc.health.v1 with SERVING."""
        try:
            answer = health_pb2_grpc.HealthStub(self._channels[name]).Check(
                health_pb2.HealthCheckRequest(), timeout=timeout)
        except grpc.RpcError:
            return False
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    def ready(self, timeout: float = 1.0) -> bool:
        """True when every stage answers grpc.health.v1 with SERVING (its model is loaded)."""
        return all(self._stage_serving(name, timeout) for name in self._channels)

    def _timeout(self, deadline: float | None) -> float:
        if deadline is None:
            return self.stage_timeout
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the job finished")
        return min(self.stage_timeout, remaining)

    def _stage_error(self, stage: Stage, error: grpc.RpcError, control: RunControl, timeout: float,
                     attempts: int) -> ServiceError:
        name = stage.label
        address = getattr(self.addresses, name)
        code, details = error.code(), error.details() or ""
        if control.cancelled.is_set():
            return Cancelled("the job was cancelled")
        if code == grpc.StatusCode.CANCELLED:         # not by us: the stage's server stopped the call
            return Unavailable(f"the {name} stage at {address} dropped the call (it was stopping); "
                               "check its replicas")
        if code == grpc.StatusCode.UNAVAILABLE:
            tried = f" (tried {attempts} times)" if attempts > 1 else ""
            return Unavailable(f"the {name} stage at {address} is unavailable{tried}: {details}; "
                               "check that it is running")
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            return InvalidArgument(f"the {name} stage refused the request: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return ResourceExhausted(f"the {name} stage is full: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            if timeout < self.stage_timeout:          # the job's own deadline came first
                return DeadlineExceeded(f"the job's deadline passed while the {name} stage at {address} "
                                        "worked on it (or while the job waited for a replica of it)")
            if not self._stage_serving(name, 0.5):
                return DeadlineExceeded(f"the {name} stage at {address} did not answer within the stage timeout "
                                        f"({self.stage_timeout:g} s) and does not report SERVING now: it is down, "
                                        "hung or still loading; check its replicas")
            return DeadlineExceeded(f"the {name} stage at {address} did not finish within the stage timeout "
                                    f"({self.stage_timeout:g} s); raise --stage-timeout for jobs this large, or "
                                    "add replicas if the stage is overloaded")
        return ServiceError(f"the {name} stage failed ({code.name}): {details}")

    def run(self, job_id: str, params: Params, control: RunControl | None = None,
            deadline: float | None = None, resume: bytes | None = None, checkpoint_every: int = 0,
            preview_every: int = 0, return_frames: bool = False) -> Iterator[RunEvent]:
        """Encode, denoise, decode; yield events; the last one is the Result. Raises ServiceError.

        With ``checkpoint_every`` N > 0 the denoiser's state comes back every N steps as a Checkpoint; with
        ``resume`` (a Checkpoint's data) denoising goes on from that step. A denoiser replica that dies
        mid-call is retried from the last checkpoint too, not from step 1. With ``preview_every`` N > 0 a
        Preview comes every N steps and after the last (or one Warning, if the denoiser has no map for them)."""
        control = control or RunControl()
        yield StageStarted(Stage.TEXT_ENCODER)
        prompts = [params.negative_prompt, params.prompt] if params.uses_guidance else [params.prompt]
        encode = text_encoder_pb2.EncodeRequest(prompts=prompts, request_id=job_id)
        encoded = yield from self._call(job_id, Stage.TEXT_ENCODER, control, deadline,
                                        lambda timeout, call: self._unary(self.text_encoder.Encode, encode, timeout,
                                                                          control, call))
        for which, info in zip(["negative_prompt", "prompt"][-len(prompts):], encoded.prompts):
            if info.truncated:
                yield Warning(f"{which} has {info.num_tokens} tokens; the model reads 77, so this was "
                              f"dropped: {info.dropped_text!r}")

        if params.cache == "deep":     # DESIGN section 5: anything approximate is reported as such
            yield Warning("cache is deep: DeepCache makes this video close to, not equal to, the exact one of "
                          "this seed (docs/api.md gives its measured fidelity); send cache none for the exact video")

        yield StageStarted(Stage.DENOISER)
        denoise = denoiser_pb2.DenoiseRequest(
            request_id=job_id, embeddings=encoded.embeddings, num_frames=params.num_frames,
            height=params.height, width=params.width, num_inference_steps=params.num_inference_steps,
            guidance_scale=params.guidance_scale, seed=params.seed, scheduler=params.scheduler, cache=params.cache,
            checkpoint_every=max(0, checkpoint_every), preview_every=max(0, preview_every))
        if resume:
            denoise.resume.ParseFromString(resume)
        warned: set[str] = set()            # the denoiser's warnings, told once however many attempts
        latents = yield from self._call(job_id, Stage.DENOISER, control, deadline,
                                        lambda timeout, call: self._denoise(denoise, timeout, control, call, warned),
                                        lambda: (f"; denoising resumes after step {denoise.resume.step}"
                                                 if denoise.HasField("resume") else "; denoising restarts from step 1"))

        yield StageStarted(Stage.DECODER)
        decode = decoder_pb2.DecodeRequest(request_id=job_id, latents=latents, fps=params.fps,
                                           return_frames=return_frames)
        decoded = yield from self._call(job_id, Stage.DECODER, control, deadline,
                                        lambda timeout, call: self._unary(self.decoder.Decode, decode, timeout,
                                                                          control, call))
        log.info(kv("job_done", job_id=job_id, mp4_bytes=len(decoded.video)))
        yield Result(video=decoded.video, mime_type=decoded.mime_type, num_frames=decoded.num_frames,
                     height=decoded.height, width=decoded.width,
                     frames=decoded.frames if return_frames else None)

    def _call(self, job_id: str, stage: Stage, control: RunControl, deadline: float | None,
              attempt: Callable[[float, "StageCall"], Any], retry_note: Callable[[], str] | None = None
              ) -> Generator[RunEvent, None, Any]:
        """One stage call (``attempt(timeout, call)``: the answer, or a generator of events that returns it),
        tried again when it fails UNAVAILABLE: its replica went away mid-call (killed, or draining past its
        grace), which gRPC's own retry policy does not cover once the call has started. At most
        ``STAGE_ATTEMPTS`` tries, each announced with a Warning and a new StageStarted: the stage starts
        over (for the denoiser, progress restarts from step 1). Every other error is final: trying again
        would not change INVALID_ARGUMENT, and a DEADLINE_EXCEEDED has used up the time.

        ``call`` carries the call's span (a no-op one when tracing is off) and the metadata for its attempts."""
        name = stage.label
        call = StageCall.start(self.tracing, _METHODS[stage], job_id, stage, getattr(self.addresses, name))
        number = 0
        try:
            for number in range(1, STAGE_ATTEMPTS + 1):
                if control.cancelled.is_set():
                    raise Cancelled("the job was cancelled")
                timeout = self._timeout(deadline)
                try:
                    answer = attempt(timeout, call)
                    if inspect.isgenerator(answer):
                        answer = yield from answer
                    call.done(grpc.StatusCode.OK, number)
                    return answer
                except grpc.RpcError as error:
                    # CANCELLED that the job did not ask for: the replica's server stopped mid-call.
                    if (error.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
                            or control.cancelled.is_set() or number == STAGE_ATTEMPTS):
                        failure = self._stage_error(stage, error, control, timeout, number)
                        call.done(error.code(), number, failure)
                        raise failure from None
                    details = error.details() or "connection lost"
                finally:
                    control.track(None)
                log.warning(kv("stage_retry", job_id=job_id, stage=name, attempt=number + 1, reason=details))
                call.span.add_event("retry", {"t2v.attempt": number + 1, "t2v.reason": details[:500]})
                note = retry_note() if retry_note is not None else ""
                yield StageRetried(f"the {name} stage failed during the call ({details}); trying again, attempt "
                                   f"{number + 1} of {STAGE_ATTEMPTS}" + note)
                control.cancelled.wait(RETRY_BACKOFF_SECONDS * 2 ** (number - 1))
                yield StageStarted(stage)
                yield Waiting(stage, f"the job waits for a replica of the {name} stage to answer (its last one went "
                                     f"away: {details}){note}; check the {name} stage's replicas if this lasts")
            raise AssertionError("unreachable: the last attempt returns or raises")
        except ServiceError as error:          # a cancel, a deadline: the span says why it ended
            call.done(None, number, error)
            raise
        except GeneratorExit:                  # the run was dropped (its gateway stops, its lease was lost)
            call.done(None, number, Cancelled("the run of the job stopped on this gateway"))
            raise
        finally:
            call.end()

    @staticmethod
    def _unary(method: Any, request: Any, timeout: float, control: RunControl, traced: "StageCall") -> Any:
        """A unary stage call that ``control.cancel()`` stops at once, and that waits (up to ``timeout``)
        for a SERVING replica instead of failing at once when none is up (``wait_for_ready``)."""
        call = method.future(request, timeout=timeout, wait_for_ready=True, metadata=traced.metadata)
        control.track(call)
        try:
            return call.result()
        except grpc.FutureCancelledError:
            raise Cancelled("the job was cancelled") from None

    def _denoise(self, request: denoiser_pb2.DenoiseRequest, timeout: float, control: RunControl,
                 traced: "StageCall", warned: set[str]) -> Generator[RunEvent, None, Any]:
        """The Denoise stream: yields a Progress per step, a Checkpoint or a Preview when one comes, and a
        Warning for each of the denoiser's not in ``warned`` yet; returns the latents. The last checkpoint becomes
        the request's ``resume``, so a retry goes on from there."""
        if request.HasField("resume"):
            traced.span.add_event("resume", {"t2v.step": request.resume.step})
        call = self.denoiser.Denoise(request, timeout=timeout, wait_for_ready=True, metadata=traced.metadata)
        control.track(call)
        latents = None
        for event in call:
            kind = event.WhichOneof("event")
            if kind == "progress":
                p = event.progress
                yield Progress(p.step, p.total_steps, p.timestep)
            elif kind == "checkpoint":
                traced.span.add_event("checkpoint", {"t2v.step": event.checkpoint.step})
                request.resume.CopyFrom(event.checkpoint)
                yield Checkpoint(event.checkpoint.step, event.checkpoint.SerializeToString())
            elif kind == "preview":
                p = event.preview
                yield Preview(p.step, p.total_steps, p.png, p.num_frames, p.columns, p.rows, p.frame_width,
                              p.frame_height)
            elif kind == "warning" and event.warning not in warned:
                warned.add(event.warning)
                yield Warning(event.warning)
            elif kind == "latents":
                latents = event.latents
        if latents is None:
            raise ServiceError("the denoiser stage ended its stream without latents")
        return latents


class StageCall:
    """The span of one stage call (all its attempts) and the gRPC metadata that carries it to the stage: a
    CLIENT span under the current one when tracing is on; else the API's no-op span and no metadata."""

    def __init__(self, span: Span, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.span = span
        self.metadata = metadata
        self._done = False

    @classmethod
    def start(cls, tracing: Tracing, method: str, job_id: str, stage: Stage, address: str) -> "StageCall":
        if not tracing.enabled:
            return cls(trace.INVALID_SPAN)
        span = tracing.start_span(span_name(method), kind=SpanKind.CLIENT, attributes={
            **rpc_attributes(method), JOB_ID: job_id, "t2v.stage": stage.label, "server.address": address})
        return cls(span, tracing.metadata(span))

    def done(self, code: grpc.StatusCode | None, attempts: int, error: ServiceError | None = None) -> None:
        """How the call ended: its last status code (None: it did not get one) and the error it became."""
        if self._done or not self.span.is_recording():
            return
        self._done = True
        self.span.set_attribute("t2v.attempts", attempts)
        if code is not None:
            self.span.set_attribute("rpc.grpc.status_code", code.value[0])
        if error is not None:
            self.span.set_attribute("t2v.error_code", error.code.name)
            if not isinstance(error, Cancelled):     # a cancel is the job's wish, not the stage's fault
                self.span.set_status(Status(StatusCode.ERROR, error.message))

    def end(self) -> None:
        self.span.end()
