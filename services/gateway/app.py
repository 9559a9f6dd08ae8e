"""The gateway as one object: it builds and owns everything (config, metrics, job and result stores, the
job system with its dispatcher, the orchestrator, the gRPC servicer and the HTTP server) and starts and
stops them in order.

Why here and nowhere else: the two front doors (``server.py`` for gRPC, ``http.py`` for HTTP) are
siblings that only translate; neither builds the other or the job system. ``t2v serve gateway`` runs
``main``; the tests build a ``Gateway`` from a ``GatewayConfig`` and serve it on a loopback port.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import grpc

from services.common.auth import ENV_ADMIN_KEYS, ENV_KEYS, ApiKeyInterceptor, load_api_keys
from services.common.config import DEFAULT_MODEL, ServerConfig, parse_config, setting
from services.common.contract import DEFAULT_VAE_SCALE_FACTOR
from services.common.logs import kv
from services.common.model_folder import vae_scale_factor
from services.common.server import ReadyGate, serve
from services.common.tls import ClientTls, load_client_tls, load_server_tls
from services.common.tracing import Tracing
from services.gateway import orchestrator as orch
from services.gateway.domain import Limits
from services.gateway.http import Backend, HttpServer, start_http
from services.gateway.jobs import JobService, JobSettings
from services.gateway.metrics import GatewayMetrics
from services.gateway.observer import JobObserver
from services.gateway.ratelimit import RateLimiter, RateLimitInterceptor
from services.gateway.server import SERVICE_NAME, STREAMS_HINT, GatewayServicer
from services.gateway.store import check_url, describe_url, open_stores
from services.gateway.tenancy import Tenancy
from t2v.v1 import gateway_pb2_grpc

log = logging.getLogger("gateway")


@dataclass(frozen=True)
class GatewayConfig(ServerConfig):
    port: int = setting(50050, "port to listen on (0 = any free port)")
    text_encoder: str = setting("127.0.0.1:50051", "text_encoder stage address (host:port or dns:///name:port)")
    denoiser: str = setting("127.0.0.1:50052", "denoiser stage address")
    decoder: str = setting("127.0.0.1:50053", "decoder stage address")
    model: str = setting(DEFAULT_MODEL, "model folder; the gateway reads only unet/config.json and vae/config.json, "
                                        "for the default size and the VAE scale factor sizes must be multiples of")
    default_size: int = setting(0, "height and width when a request leaves them 0 (0 = the model's "
                                   "sample_size x VAE scale factor)")
    stage_timeout: float = setting(600.0, "longest a single stage call may take, in seconds")
    max_frames: int = setting(64, "largest num_frames accepted")
    max_size: int = setting(1024, "largest height or width accepted")
    max_steps: int = setting(200, "largest num_inference_steps accepted")
    max_prompt_chars: int = setting(10_000, "longest prompt accepted, in characters")
    slots: int = setting(4, "jobs run at once, across every gateway of the job store: how many the denoiser pool "
                            "takes; the rest wait in the queue")
    max_queue: int = setting(256, "most jobs waiting; more are refused with RESOURCE_EXHAUSTED and a retry-after")
    aging_seconds: float = setting(60.0, "a waiting job rises one priority level per this many seconds "
                                         "(0 = no aging)")
    state_dir: str = setting("out/state", "folder for the embedded job store (jobs.sqlite3) and the videos (results/); "
                                          "unused with a PostgreSQL --job-store")
    job_store: str = setting("", "where jobs live: sqlite:///PATH (one gateway; default <state-dir>/jobs.sqlite3) or "
                                 "postgresql://USER@HOST:PORT/DB (any number of gateways share it)")
    result_store: str = setting("", "where videos live: unset = beside the jobs (<state-dir>/results for SQLite, "
                                    "the same database for PostgreSQL), or file:///PATH")
    lease_seconds: float = setting(10.0, "a running job's lease: if its gateway dies, another takes the job over "
                                         "this long after its last renewal")
    checkpoint_every: int = setting(10, "denoising steps between checkpoints of a running job, from which a "
                                        "gateway that takes it over resumes (0 = none: it restarts)")
    preview_every: int = setting(5, "denoising steps between live previews of a job that asks for them "
                                    "(GenerationParams.preview, \"preview\": true over HTTP; the web page does), and "
                                    "one after the last step (0 = previews off for every job; one that asks is "
                                    "told in a warning)")
    result_ttl_hours: float = setting(24.0, "hours a finished video is kept; then GetVideo says it expired")
    cleanup_interval_seconds: float = setting(60.0, "how often expired videos are deleted, in seconds")
    api_keys_file: str = setting("", "file with one API key per line; set (or T2V_API_KEYS=k1,k2) to require "
                                     "'authorization: Bearer <key>' on every call except health checks; each key "
                                     "sees only the jobs it made")
    admin_keys_file: str = setting("", "file with one admin API key per line (or T2V_ADMIN_API_KEYS=k1,k2): "
                                       "valid keys that see and cancel every key's jobs (operators, t2v jobs)")
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


def model_scale_factor(model: str) -> int:
    """The model's VAE scale factor (``model_folder.vae_scale_factor``, 8 for text-to-video-ms-1.7b), as the
    denoiser and decoder read it; diffusers' 8 when the gateway has no model folder to read."""
    if not (Path(model) / "vae" / "config.json").is_file():
        return DEFAULT_VAE_SCALE_FACTOR
    return vae_scale_factor(model)


def model_default_size(model: str) -> int:
    """The pipeline's default height/width: unet sample_size * the VAE scale factor (256 for
    text-to-video-ms-1.7b, 32 * 8)."""
    config = Path(model) / "unet" / "config.json"
    if not config.is_file():
        return 256
    return int(json.loads(config.read_text()).get("sample_size", 32)) * model_scale_factor(model)


def limits_from(config: GatewayConfig) -> Limits:
    return Limits(max_frames=config.max_frames, max_size=config.max_size, max_steps=config.max_steps,
                  max_prompt_chars=config.max_prompt_chars,
                  default_size=config.default_size or model_default_size(config.model),
                  vae_scale_factor=model_scale_factor(config.model))


def settings_from(config: GatewayConfig) -> JobSettings:
    """The job system's settings; a value that cannot work raises ValueError naming its flag."""
    for name, value, least in [("slots", config.slots, 1), ("max-queue", config.max_queue, 1),
                               ("aging-seconds", config.aging_seconds, 0), ("lease-seconds", config.lease_seconds, 0.1),
                               ("checkpoint-every", config.checkpoint_every, 0),
                               ("preview-every", config.preview_every, 0),
                               ("result-ttl-hours", config.result_ttl_hours, 0),
                               ("cleanup-interval-seconds", config.cleanup_interval_seconds, 0.01)]:
        if not value >= least:
            raise ValueError(f"--{name} is {value}; it must be at least {least}")
    return JobSettings(slots=config.slots, max_queue=config.max_queue, aging_seconds=config.aging_seconds,
                       result_ttl_seconds=config.result_ttl_hours * 3600,
                       cleanup_interval_seconds=config.cleanup_interval_seconds,
                       model=os.path.realpath(config.model), lease_seconds=config.lease_seconds,
                       checkpoint_every=config.checkpoint_every, preview_every=config.preview_every,
                       poll_seconds=min(1.0, max(0.05, config.lease_seconds / 4)))


class _GatewayGate(ReadyGate):
    """The ready gate, which also tells the gateway when the server starts draining."""

    def __init__(self, on_drain: Callable[[], None]) -> None:
        super().__init__("gateway")
        self._on_drain = on_drain

    def drain(self) -> None:
        self._on_drain()
        super().drain()


class Gateway:
    """Everything of one gateway process. ``load`` starts it (``serve`` calls it once listening); ``close``
    stops it. ``servicer`` is what the gRPC server serves."""

    def __init__(self, config: GatewayConfig, observer: JobObserver | None = None) -> None:
        self.config = config
        self.draining = threading.Event()
        self.gate = _GatewayGate(self._drain)
        self.limits = limits_from(config)
        self.settings = settings_from(config)
        check_url(config.job_store)
        if config.result_store:
            check_url(config.result_store, "--result-store")
        self.metrics = GatewayMetrics()   # serve() serves it on --metrics-port; grpc_errors counts calls
        self.rate_limiter = rate_limiter_from(config, self.metrics.rate_limited)   # gRPC and HTTP share it
        self.observer = observer or self.metrics
        self.orchestrator: orch.Orchestrator | None = None
        self.jobs: JobService | None = None
        self.http: HttpServer | None = None
        self.tenancy = Tenancy(api_keys_from(config), admin_keys_from(config))   # ApiKeyError: a bad key file
        self.servicer = GatewayServicer(self._service, self.limits, self.draining, self.tenancy)
        self.streams_hint = STREAMS_HINT      # serve() ends a --max-streams refusal with it
        # last: nothing above may fail once the exporter's thread runs (ValueError: a bad --otlp-endpoint)
        self.tracing = Tracing.for_service("t2v-gateway", config.otlp_endpoint)

    def load(self) -> None:
        self.orchestrator = orch.Orchestrator(
            orch.StageAddresses(self.config.text_encoder, self.config.denoiser, self.config.decoder),
            self.config.max_message_bytes, self.config.stage_timeout, stage_tls_from(self.config), self.tracing)
        store, results = open_stores(self.config.job_store, self.config.state_dir, self.config.result_store)
        self.metrics.watch_result_store(results.space)     # free bytes at each scrape (file stores)
        log.info(kv("job_store", url=describe_url(self.config.job_store) or f"sqlite in {self.config.state_dir}",
                    shared=store.shared))
        shared_buckets = store.rate_buckets()
        if self.rate_limiter is not None and shared_buckets is not None:
            self.rate_limiter.use(shared_buckets)   # type: ignore[arg-type] - one budget per key on every gateway
        self.jobs = JobService(store, results, self.metrics.observing(self.orchestrator), self.settings,
                               self.observer, stages_ready=self.orchestrator.ready, tracing=self.tracing).start()
        self.http = start_http(Backend(self._service, self.limits, self.config.model, self.orchestrator.ready,
                                       api_keys_from(self.config), self.rate_limiter, self.tenancy,
                                       metrics=self.metrics, tracing=self.tracing),
                               self.config.host, self.config.http_port,
                               load_server_tls(self.config.tls_cert, self.config.tls_key, self.config.tls_client_ca))

    def ready(self) -> bool:
        """Readiness: the job store answers and every stage has a replica SERVING, so a job runs now. The
        health of ``t2v.v1.Gateway`` follows it; the server's (``""``) stays SERVING while a stage is down,
        because jobs are still accepted (they wait for the stage) and a liveness probe must not restart the
        gateway for a stage's fault."""
        return (self.jobs is not None and self.jobs.healthy() and self.orchestrator is not None
                and self.orchestrator.ready(timeout=0.5))

    def _drain(self) -> None:
        """SIGTERM: take no new jobs; a Generate cut off from now on leaves its job to the next gateway."""
        self.draining.set()
        if self.jobs is not None:
            self.jobs.stop_accepting()

    def close(self, grace: float = 0.0) -> None:
        """Stop the job system (running jobs get ``grace`` seconds, then go on elsewhere or after a restart)."""
        self.draining.set()
        if self.jobs is not None:
            self.jobs.stop(grace)          # first: open event streams get their last event
        if self.http is not None:
            self.http.stop()
        if self.orchestrator is not None:
            self.orchestrator.close()
        self.tracing.shutdown()            # last: the jobs' last spans are exported

    def _service(self) -> JobService:
        self.gate.check()
        assert self.jobs is not None
        return self.jobs


def api_keys_from(config: GatewayConfig) -> frozenset[str]:
    """Every key the gateway lets in: those of --api-keys-file and T2V_API_KEYS, and the admin keys (empty =
    keys off); gRPC and HTTP check the same ones."""
    return load_api_keys(config.api_keys_file, os.environ.get(ENV_KEYS)) | admin_keys_from(config)


def admin_keys_from(config: GatewayConfig) -> frozenset[str]:
    """The keys of --admin-keys-file and T2V_ADMIN_API_KEYS: they see every key's jobs."""
    return load_api_keys(config.admin_keys_file, os.environ.get(ENV_ADMIN_KEYS), "--admin-keys-file")


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
        stage_tls_from(config)
        load_server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
        gateway = Gateway(config)
        interceptors = interceptors_from(config, gateway.rate_limiter)
    except ValueError as error:        # a bad setting, an ApiKeyError or a TlsConfigError
        raise SystemExit(f"gateway: {error}") from None
    try:
        serve(config, "gateway", SERVICE_NAME, gateway, gateway.gate,
              lambda server: gateway_pb2_grpc.add_GatewayServicer_to_server(gateway.servicer, server), interceptors,
              readiness=gateway.ready)
    finally:
        gateway.close(config.grace_seconds)
