"""Server bootstrap shared by every service: health, reflection (v1 and v1alpha), message limits, graceful stop.

Why here: the four services differ only in their servicer and their model; how they start, report
readiness (grpc.health.v1 is NOT_SERVING until the model is loaded) and stop (SIGTERM -> refuse new
calls, let in-flight ones finish for ``grace_seconds``) must be identical and tested once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent import futures
from typing import Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from services.common.config import ModelConfig, ServerConfig, describe
from services.common.errors import Unavailable
from services.common.logs import kv, setup_logging
from services.common.reflection import enable_server_reflection
from services.common.metrics import ServiceMetrics, metrics_of
from services.common.tls import check_stage_exposure, load_server_tls
from services.common.tracing import TraceInterceptor, Tracing


log = logging.getLogger(__name__)


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    """The same limit on both ends of every channel; never the 4 MiB default."""
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


# Why: gRPC sets SO_REUSEPORT by default, so a second server on a port already taken would bind too and
# share the port silently; without it, binding a port in use fails and ``start`` says so.
NO_REUSEPORT = [("grpc.so_reuseport", 0)]


def connection_age_options(seconds: float) -> list[tuple[str, int]]:
    """Why: a gateway's round_robin channel resolves a headless Service only when a connection drops;
    ageing connections out makes it pick up replicas added by the autoscaler. A long Denoise stream in
    flight is not cut: it gets ``CONNECTION_AGE_GRACE_MS`` to finish."""
    if seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS)]


CONNECTION_AGE_GRACE_MS = 30 * 60 * 1000


class Loadable(Protocol):
    """A servicer whose model is loaded after the server is listening."""

    def load(self) -> None: ...


class ReadyGate:
    """Refuses calls with UNAVAILABLE until the model is loaded, and again while draining."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._ready = threading.Event()
        self._draining = threading.Event()

    def open(self) -> None:
        self._ready.set()

    def drain(self) -> None:
        self._draining.set()

    def check(self) -> None:
        if self._draining.is_set():
            raise Unavailable(f"{self._service} is shutting down; retry on another replica")
        if not self._ready.is_set():
            raise Unavailable(f"{self._service} is still loading its model; retry in a few seconds")


class InFlight(grpc.ServerInterceptor):
    """Counts the calls being handled (health and reflection aside), so a drain can wait for them
    while the server still answers.

    Why: a call that reaches a gRPC server that has begun to stop is cancelled (the client sees
    CANCELLED, which the gateway would take for a cancelled job), not refused. So a draining server
    keeps listening, its ReadyGate refuses new work with UNAVAILABLE ("retry on another replica"),
    and gRPC is stopped only once the calls in flight are done (or the grace is over)."""

    _UNCOUNTED = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self) -> None:
        self._count = 0
        self._idle = threading.Condition()

    def _enter(self) -> None:
        with self._idle:
            self._count += 1

    def _exit(self) -> None:
        with self._idle:
            self._count -= 1
            if self._count == 0:
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """True once no counted call is in flight; False if ``timeout`` seconds pass first."""
        with self._idle:
            return self._idle.wait_for(lambda: self._count == 0, timeout=max(0.0, timeout))

    def _counted(self, behaviour: Callable, streams: bool) -> Callable:
        def unary(request_or_iterator, context):
            self._enter()
            try:
                return behaviour(request_or_iterator, context)
            finally:
                self._exit()

        def stream(request_or_iterator, context):
            self._enter()
            try:
                yield from behaviour(request_or_iterator, context)
            finally:
                self._exit()
        return stream if streams else unary

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 - gRPC's signature
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(self._UNCOUNTED):
            return handler
        kinds = [("unary_unary", grpc.unary_unary_rpc_method_handler, False),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, True),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, False),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, True)]
        for name, make, streams in kinds:
            behaviour = getattr(handler, name)
            if behaviour is not None:
                return make(self._counted(behaviour, streams), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler


STREAM_RETRY_AFTER_SECONDS = 5


class StreamLimit(grpc.ServerInterceptor):
    """At most ``limit`` response-streaming calls at once (``--max-streams``); one more is refused at once with
    RESOURCE_EXHAUSTED, a sentence and a ``retry-after`` trailer, before the servicer sees it (so a refused
    ``Generate`` creates no job).

    Why: a sync gRPC server runs each call on one of its ``--max-workers`` threads for the call's whole life, and
    a stream (a ``Generate`` waiting for its job, a ``Denoise`` running) holds its thread for minutes. With as
    many streams as threads, health checks and short calls wait in the pool's queue until their deadline, and a
    liveness probe restarts a healthy server. Capping streams below the pool keeps threads for everything else.
    Health is exempt (``Check`` is unary and quick; ``Watch`` holds no thread: grpc serves it non-blocking);
    reflection streams count, since a client can keep one open."""

    _EXEMPT = ("/grpc.health.v1.",)

    def __init__(self, limit: int, hint: str = "", on_refused: Callable[[str], None] | None = None) -> None:
        self.limit = limit
        self._hint = hint
        self._on_refused = on_refused
        self._open = 0
        self._lock = threading.Lock()

    @property
    def open(self) -> int:
        """Streaming calls being served now."""
        return self._open

    def _take(self) -> bool:
        with self._lock:
            if self._open >= self.limit:
                return False
            self._open += 1
            return True

    def _release(self) -> None:
        with self._lock:
            self._open -= 1

    def _refuse(self, method: str, context: grpc.ServicerContext) -> None:
        log.info(kv("stream_refused", method=method, open=self.limit, reason="--max-streams"))
        if self._on_refused is not None:
            self._on_refused(method)
        context.set_trailing_metadata((("retry-after", str(STREAM_RETRY_AFTER_SECONDS)),))
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                      f"this server already has {self.limit} streaming calls open, its limit (--max-streams); "
                      f"retry in about {STREAM_RETRY_AFTER_SECONDS} s{self._hint}")

    def _limited(self, behaviour: Callable, method: str) -> Callable:
        def stream(request_or_iterator, context):
            if not self._take():
                self._refuse(method, context)
            try:
                yield from behaviour(request_or_iterator, context)
            finally:
                self._release()
        return stream

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 - gRPC's signature
        handler = continuation(handler_call_details)
        full = handler_call_details.method
        if handler is None or not handler.response_streaming or full.startswith(self._EXEMPT):
            return handler
        method = full.rsplit("/", 1)[-1]
        if handler.request_streaming:
            return grpc.stream_stream_rpc_method_handler(
                self._limited(handler.stream_stream, method), request_deserializer=handler.request_deserializer,
                response_serializer=handler.response_serializer)
        return grpc.unary_stream_rpc_method_handler(
            self._limited(handler.unary_stream, method), request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer)


class GrpcServer:
    """One gRPC server with health and reflection; ``start`` binds and returns the real port.

    With ``tls_cert``/``tls_key`` the port speaks TLS only (and with ``tls_client_ca``, mutual TLS);
    bad TLS settings raise ``TlsConfigError`` here, before anything listens. With ``health_port`` >= 0
    a second, plaintext server answers grpc.health.v1 only (the same statuses): Kubernetes' gRPC probes
    can present no certificate, and health says nothing but SERVING or not.

    Streaming calls are capped at ``config.stream_limit`` (``StreamLimit``, innermost: a call refused for its
    key or its rate never takes a stream); ``metrics`` (a ``ServiceMetrics``) then reports the open streams
    and the refusals, and ``streams_hint`` ends the refusal's sentence (what else the client can do). A bad
    ``--max-streams`` raises ValueError here, naming the flag.

    With ``tracing`` on (the servicer's ``Tracing``, see ``tracing.py``), every call but health and reflection
    is a SERVER span (``TraceInterceptor``, outermost, so a call refused for its key, rate or the stream cap is
    one too), continuing the caller's trace from its ``traceparent`` metadata."""

    def __init__(self, config: ServerConfig, service_name: str,
                 add_servicer: Callable[[grpc.Server], None],
                 interceptors: "list[grpc.ServerInterceptor] | None" = None,
                 metrics: ServiceMetrics | None = None, streams_hint: str = "",
                 tracing: Tracing | None = None) -> None:
        self.config = config
        self.service_name = service_name
        self.in_flight = InFlight()
        self.streams = StreamLimit(config.stream_limit, streams_hint,
                                   metrics.stream_refused if metrics is not None else None)
        if metrics is not None:
            metrics.watch_streams(lambda: self.streams.open)
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                                   options=message_options(config.max_message_bytes)
                                   + connection_age_options(config.max_connection_age_seconds)
                                   + NO_REUSEPORT,
                                   interceptors=[*([TraceInterceptor(tracing)] if tracing and tracing.enabled else []),
                                                 self.in_flight, *(interceptors or []), self.streams])
        self.tls = load_server_tls(config.tls_cert, config.tls_key, config.tls_client_ca)
        add_servicer(self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self._health_server: grpc.Server | None = None
        if config.health_port >= 0:
            self._health_server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=NO_REUSEPORT)
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
        enable_server_reflection((service_name, health.SERVICE_NAME), self._server)     # v1 and v1alpha
        self.set_serving(False)
        self.port = 0
        self.health_port = -1

    def start(self) -> int:
        try:        # a port that cannot be bound: 0 from older gRPC, RuntimeError("Failed to bind ...") from newer
            if self.tls is None:
                self.port = self._server.add_insecure_port(self.config.address)
            else:
                self.port = self._server.add_secure_port(self.config.address, self.tls.grpc_credentials())
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.config.address}: is the port already in use?")
        if self._health_server is not None:
            address = f"{self.config.host}:{self.config.health_port}"
            try:
                self.health_port = self._health_server.add_insecure_port(address)
            except RuntimeError:
                self.health_port = 0
            if self.health_port == 0:
                self._server.stop(0)
                raise RuntimeError(f"cannot serve health checks on {address}: is the port already in use?")
            self._health_server.start()
        self._server.start()
        return self.port

    def set_serving(self, serving: bool, names: "tuple[str, ...] | None" = None) -> None:
        """Health of ``names`` (default: the server, ``""``, and its service)."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names if names is not None else ("", self.service_name):
            self._health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        """NOT_SERVING, let the calls in flight finish (new ones are refused UNAVAILABLE by the servicer's
        drained ReadyGate meanwhile) for up to ``grace`` seconds, then stop gRPC (cancelling what is left)."""
        self.set_serving(False)
        grace = self.config.grace_seconds if grace is None else grace
        deadline = time.monotonic() + grace
        self.in_flight.wait_idle(grace)
        self._server.stop(max(0.0, deadline - time.monotonic())).wait()
        if self._health_server is not None:       # last: probes see NOT_SERVING while calls drain
            self._health_server.stop(0)

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(config: ServerConfig, service: str, service_name: str, servicer: Loadable, gate: ReadyGate,
          add_servicer: Callable[[grpc.Server], None],
          interceptors: "list[grpc.ServerInterceptor] | None" = None,
          readiness: Callable[[], bool] | None = None) -> None:
    """Run a service until SIGTERM/SIGINT: listen, load the model, report SERVING, drain, stop.

    ``readiness`` (the gateway's: are the stages up?) is asked every half second once loaded; the health of
    ``service_name`` follows it, while the server's (``""``, what liveness probes ask) stays SERVING."""
    log = setup_logging(service, config.log_level)
    log.info("event=config " + describe(config))
    tracing = getattr(servicer, "tracing", None)
    if tracing is not None and tracing.enabled:
        log.info(kv("tracing", service_name=tracing.service, otlp=tracing.url))
    metrics = metrics_of(servicer, service)
    try:
        server = GrpcServer(config, service_name, add_servicer, interceptors, metrics,
                            getattr(servicer, "streams_hint", ""), tracing)
        if isinstance(config, ModelConfig):          # a stage: no API key guards it
            check_stage_exposure(config.host, bool(server.tls and server.tls.mutual), config.trusted_network, service)
    except ValueError as exc:          # a TlsConfigError, or a --max-streams that leaves no thread
        raise SystemExit(f"{service}: {exc}") from None
    try:
        port = server.start()
    except RuntimeError as exc:      # a port in use: one line, exit non-zero
        log.error(kv("listen_failed", reason=str(exc)))
        raise SystemExit(f"{service}: {exc}") from None
    log.info(kv("listening", address=f"{config.host}:{port}", health="NOT_SERVING",
                tls="mutual" if server.tls and server.tls.mutual else "on" if server.tls else "off",
                **({"health_port": server.health_port} if server.health_port >= 0 else {})))
    metrics.serve_http(config.host, config.metrics_port)   # -1 = off

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    started = time.monotonic()
    try:
        servicer.load()
    except Exception as exc:  # noqa: BLE001 - report the reason in one line and exit non-zero
        log.error(kv("load_failed", reason=str(exc)))
        server.stop(0)
        raise SystemExit(f"{service}: {exc}") from None
    gate.open()
    server.set_serving(True)
    metrics.model_loaded(time.monotonic() - started)
    log.info(kv("serving", address=f"{config.host}:{port}", load_seconds=round(time.monotonic() - started, 2)))

    ready = True
    while True:
        if readiness is not None and readiness() != ready:
            ready = not ready
            server.set_serving(ready, (service_name,))
            log.info(kv("readiness", service=service_name, health="SERVING" if ready else "NOT_SERVING"))
        if stop.wait(0.5):
            break
    log.info(kv("draining", grace_seconds=config.grace_seconds))
    gate.drain()
    server.stop()
    metrics.stop_http()
    log.info(kv("stopped"))
