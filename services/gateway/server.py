"""Gateway gRPC servicer: the public front door. Validates a request, hands it to the job system,
translates the answers to protobuf.

Every request is a job (``jobs.JobService``: SQLite rows, a priority queue, ``--slots`` workers running
the orchestrator, a result store with a TTL). Generate is SubmitJob + watching the job, streamed;
SubmitJob / GetJob / ListJobs / CancelJob / GetVideo expose the same jobs one call at a time. Nothing
here decides anything: the rules live in jobs.py, queue.py, store.py and validation.py. With
``--http-port``, http.py serves the same job system over HTTP (and the web page) from this process.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import grpc

from services.common.auth import ENV_KEYS, ApiKeyInterceptor, load_api_keys
from services.common.config import DEFAULT_MODEL, ServerConfig, parse_config, setting
from services.common.errors import Unavailable, grpc_errors
from services.common.server import ReadyGate, serve
from services.common.tls import ClientTls, load_client_tls, load_server_tls
from services.gateway import messages
from services.gateway import orchestrator as orch
from services.gateway.http import Backend, HttpServer, start_http
from services.gateway.jobs import Finished, Interrupted, JobRequest, JobService, JobSettings
from services.gateway.metrics import GatewayMetrics
from services.gateway.observer import JobObserver
from services.gateway.queue import QueueFull
from services.gateway.ratelimit import RateLimiter, RateLimitInterceptor
from services.gateway.store import JobStatus
from services.gateway.validation import Limits, validate
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
    slots: int = setting(4, "jobs run at once: how many the denoiser pool takes; the rest wait in the queue")
    max_queue: int = setting(256, "most jobs waiting; more are refused with RESOURCE_EXHAUSTED and a retry-after")
    aging_seconds: float = setting(60.0, "a waiting job rises one priority level per this many seconds "
                                         "(0 = no aging)")
    state_dir: str = setting("out/state", "folder for the job database (jobs.sqlite3) and the videos (results/)")
    result_ttl_hours: float = setting(24.0, "hours a finished video is kept; then GetVideo says it expired")
    cleanup_interval_seconds: float = setting(60.0, "how often expired videos are deleted, in seconds")
    api_keys_file: str = setting("", "file with one API key per line; set (or T2V_API_KEYS=k1,k2) to require "
                                     "'authorization: Bearer <key>' on every call except health checks")
    http_port: int = setting(-1, "port of the HTTP API (/v1/videos) and the web page (/) on --host "
                                 "(-1 = off, 0 = any free port); t2v up uses the gRPC port + 30")
    rate_limit_per_minute: float = setting(0.0, "requests a minute each API key may make, gRPC and HTTP together "
                                                "(each client address when keys are off); more are refused with "
                                                "RESOURCE_EXHAUSTED / 429 and a retry-after (0 = no limit)")
    rate_limit_burst: int = setting(0, "requests a key may make at once before --rate-limit-per-minute applies "
                                       "(0 = one minute's worth)")
    stage_tls_ca: str = setting("", "PEM CA bundle that signed the stages' certificates; set, the gateway calls "
                                    "the stages over TLS")
    stage_tls_cert: str = setting("", "PEM client certificate the gateway presents to the stages (mutual TLS; "
                                      "with --stage-tls-key, needs --stage-tls-ca)")
    stage_tls_key: str = setting("", "PEM private key of --stage-tls-cert")


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


def settings_from(config: GatewayConfig) -> JobSettings:
    """The job system's settings; a value that cannot work raises ValueError naming its flag."""
    for name, value, least in [("slots", config.slots, 1), ("max-queue", config.max_queue, 1),
                               ("aging-seconds", config.aging_seconds, 0),
                               ("result-ttl-hours", config.result_ttl_hours, 0),
                               ("cleanup-interval-seconds", config.cleanup_interval_seconds, 0.01)]:
        if not value >= least:
            raise ValueError(f"--{name} is {value}; it must be at least {least}")
    return JobSettings(slots=config.slots, max_queue=config.max_queue, aging_seconds=config.aging_seconds,
                       result_ttl_seconds=config.result_ttl_hours * 3600,
                       cleanup_interval_seconds=config.cleanup_interval_seconds,
                       model=os.path.realpath(config.model))


def _deadline_seconds(context: grpc.ServicerContext) -> float | None:
    """Seconds left of the call's deadline; None when the client set none (gRPC then reports years)."""
    remaining = context.time_remaining()
    if remaining is None or remaining > 10 * 365 * 24 * 3600:
        return None
    return max(remaining, 0.001)


def _retry_after(context: grpc.ServicerContext, error: QueueFull) -> None:
    """A full queue: tell the client when to come back, in the trailing metadata too."""
    context.set_trailing_metadata((("retry-after", str(error.retry_after_seconds)),))


class _GatewayGate(ReadyGate):
    """The ready gate, which also tells the servicer when the server starts draining."""

    def __init__(self, on_drain: Callable[[], None]) -> None:
        super().__init__("gateway")
        self._on_drain = on_drain

    def drain(self) -> None:
        self._on_drain()
        super().drain()


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, config: GatewayConfig, observer: JobObserver | None = None) -> None:
        self.config = config
        self.draining = threading.Event()
        self.gate = _GatewayGate(self._drain)
        self.limits = limits_from(config)
        self.metrics = GatewayMetrics()   # serve() serves it on --metrics-port; grpc_errors counts calls
        self.rate_limiter = rate_limiter_from(config, self.metrics.rate_limited)   # gRPC and HTTP share it
        self.observer = observer or self.metrics
        self.orchestrator: orch.Orchestrator | None = None
        self.jobs: JobService | None = None
        self.http: HttpServer | None = None

    def load(self) -> None:
        self.orchestrator = orch.Orchestrator(
            orch.StageAddresses(self.config.text_encoder, self.config.denoiser, self.config.decoder),
            self.config.max_message_bytes, self.config.stage_timeout, stage_tls_from(self.config))
        self.jobs = JobService.open(self.config.state_dir, self.metrics.observing(self.orchestrator),
                                    settings_from(self.config), self.observer,
                                    stages_ready=self.orchestrator.ready).start()
        self.http = start_http(Backend(self._service, self.limits, self.config.model, self.orchestrator.ready,
                                       api_keys_from(self.config), self.rate_limiter),
                               self.config.host, self.config.http_port,
                               load_server_tls(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca))

    def ready(self) -> bool:
        """Readiness: every stage has a replica SERVING, so a job runs now. The health of ``t2v.v1.Gateway``
        follows it; the server's (``""``) stays SERVING while a stage is down, because jobs are still accepted
        (they wait for the stage) and a liveness probe must not restart the gateway for a stage's fault."""
        return self.orchestrator is not None and self.orchestrator.ready(timeout=0.5)

    def _drain(self) -> None:
        """SIGTERM: take no new jobs; a Generate cut off from now on leaves its job to the next gateway."""
        self.draining.set()
        if self.jobs is not None:
            self.jobs.stop_accepting()

    def close(self, grace: float = 0.0) -> None:
        """Stop the job system (running jobs get ``grace`` seconds, then run again after a restart)."""
        self.draining.set()
        if self.jobs is not None:
            self.jobs.stop(grace)          # first: open event streams get their last event
        if self.http is not None:
            self.http.stop()
        if self.orchestrator is not None:
            self.orchestrator.close()

    def _service(self) -> JobService:
        self.gate.check()
        assert self.jobs is not None
        return self.jobs

    def _job_request(self, params: generation_pb2.GenerationParams, priority: int,
                     timeout: float | None) -> JobRequest:
        return JobRequest(validate(params, self.limits), messages.priority_from_proto(priority),
                          seed_given=params.HasField("seed"), timeout_seconds=timeout)

    @grpc_errors
    def Generate(self, request: gateway_pb2.GenerateRequest, context: grpc.ServicerContext
                 ) -> Iterator[gateway_pb2.GenerateEvent]:
        jobs = self._service()
        job_request = self._job_request(request.params, request.priority, _deadline_seconds(context))
        try:
            watch = jobs.submit_and_watch(job_request)
        except QueueFull as error:
            _retry_after(context, error)
            raise
        job_id = watch.job_id

        def client_gone() -> None:
            if not self.draining.is_set():     # a stopping server keeps the job for its successor
                jobs.abandon(job_id)
        if not context.add_callback(client_gone):
            client_gone()
        with watch:
            for update in watch:
                if isinstance(update, Finished):
                    if update.job.status != JobStatus.COMPLETED:
                        raise messages.error_for(update)
                    with jobs.open_video(job_id) as video:
                        data = video.read()
                    record = update.job.record
                    # A cached job never ran here: its warnings (e.g. truncation) come with the result.
                    yield gateway_pb2.GenerateEvent(job_id=job_id, result=messages.result_message(record, data),
                                                    warnings=list(record.warnings) if record.cached else [])
                elif isinstance(update, Interrupted):
                    raise Unavailable(update.message)
                else:
                    message = messages.event_message(job_id, update)
                    if message is not None:
                        yield message

    @grpc_errors
    def SubmitJob(self, request: gateway_pb2.SubmitJobRequest, context: grpc.ServicerContext) -> gateway_pb2.Job:
        jobs = self._service()
        job_request = self._job_request(request.params, request.priority, request.timeout_seconds or None)
        try:
            return messages.job_message(jobs.submit(job_request))
        except QueueFull as error:
            _retry_after(context, error)
            raise

    @grpc_errors
    def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.ServicerContext) -> gateway_pb2.Job:
        return messages.job_message(self._service().get(request.job_id))

    @grpc_errors
    def ListJobs(self, request: gateway_pb2.ListJobsRequest, context: grpc.ServicerContext
                 ) -> gateway_pb2.ListJobsResponse:
        views, token = self._service().list(messages.status_from_proto(request.status), request.page_size,
                                            request.page_token)
        return gateway_pb2.ListJobsResponse(jobs=[messages.job_message(v) for v in views], next_page_token=token)

    @grpc_errors
    def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.ServicerContext) -> gateway_pb2.Job:
        return messages.job_message(self._service().cancel(request.job_id))

    @grpc_errors
    def GetVideo(self, request: gateway_pb2.GetVideoRequest, context: grpc.ServicerContext
                 ) -> Iterator[gateway_pb2.VideoChunk]:
        with self._service().open_video(request.job_id) as video:
            for offset, data in video.chunks(request.offset):
                yield gateway_pb2.VideoChunk(data=data, offset=offset, total_size=video.size,
                                             mime_type=video.mime_type)


def api_keys_from(config: GatewayConfig) -> frozenset[str]:
    """The keys of --api-keys-file and T2V_API_KEYS (empty = keys off); gRPC and HTTP check the same ones."""
    return load_api_keys(config.api_keys_file, os.environ.get(ENV_KEYS))


def stage_tls_from(config: GatewayConfig) -> ClientTls | None:
    """TLS toward the stages (--stage-tls-ca, and the client certificate for mTLS); None = plaintext."""
    return load_client_tls(config.stage_tls_ca, config.stage_tls_cert, config.stage_tls_key,
                           names=("stage_tls_ca", "stage_tls_cert", "stage_tls_key"))


def rate_limiter_from(config: GatewayConfig, on_refused: Callable[[str], None] | None = None) -> RateLimiter | None:
    """The per-key rate limit of --rate-limit-per-minute / --rate-limit-burst; None when off."""
    if config.rate_limit_per_minute == 0:
        if config.rate_limit_burst < 0:
            raise ValueError(f"--rate-limit-burst is {config.rate_limit_burst}; it must be at least 0")
        return None
    return RateLimiter(config.rate_limit_per_minute, config.rate_limit_burst, on_refused=on_refused)


def interceptors_from(config: GatewayConfig, rate_limiter: RateLimiter | None = None) -> list[grpc.ServerInterceptor]:
    """The API-key check when keys are configured (--api-keys-file and/or T2V_API_KEYS), then the rate limit.
    Pass the servicer's ``rate_limiter`` so gRPC and HTTP share one budget per key; without it, one is made
    from ``config`` for gRPC alone."""
    keys = api_keys_from(config)
    limiter = rate_limiter or rate_limiter_from(config)
    return ([ApiKeyInterceptor(keys)] if keys else []) + ([RateLimitInterceptor(limiter, by_key=bool(keys))] if limiter else [])


def main(argv: Sequence[str] | None = None) -> None:
    config = parse_config(GatewayConfig, argv, "t2v serve gateway",
                          "Public gateway: validates requests, queues them as jobs and runs them through the "
                          "three stages.")
    try:
        settings_from(config)
        stage_tls_from(config)
        load_server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
        servicer = GatewayServicer(config)
        interceptors = interceptors_from(config, servicer.rate_limiter)
    except ValueError as error:        # a bad setting, an ApiKeyError or a TlsConfigError
        raise SystemExit(f"gateway: {error}") from None
    try:
        serve(config, "gateway", SERVICE_NAME, servicer, servicer.gate,
              lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server), interceptors,
              readiness=servicer.ready)
    finally:
        servicer.close(config.grace_seconds)
