"""Traces: OpenTelemetry spans, exported over OTLP/HTTP when an endpoint is set, and nothing at all otherwise.

Why one ``Tracing`` per service rather than OpenTelemetry's global provider: the resource (``service.name``:
t2v-gateway, t2v-denoiser, ...) belongs to a service, and the tests run several services in one process; each
service builds its own and hands it to whoever records spans (its gRPC server, the gateway's job system and
orchestrator). In a deployment there is one service per process, so one provider per process.

Why off costs nothing: with no endpoint (``--otlp-endpoint`` / ``T2V_OTLP_ENDPOINT``, or the standard
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT``) the SDK is not even imported: the
tracer is the API's no-op one, no span processor or exporter thread exists, the gRPC servers get no trace
interceptor and the gateway stores no trace context with its jobs.

Why a job's root span is recorded at the job's end with ids chosen at its admission: a job lives for minutes,
crosses threads and may be finished by another gateway than the one that accepted it (a PostgreSQL store).
A span can only be ended by the process that started it, so instead the admitting gateway draws the root's
trace and span ids and stores them with the job as a W3C ``traceparent``; every span of the job (queue wait,
stage calls, their server spans in the stages) names that span as its parent, and whichever gateway writes
the job's end records the root itself, with those ids, from the admission time to the end, with the end
status. One trace per job, whoever runs it.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import random
import threading
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import grpc
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

ENV_TRACES_ENDPOINT = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"   # the full URL, used as it is
ENV_ENDPOINT = "OTEL_EXPORTER_OTLP_ENDPOINT"                 # a base URL: /v1/traces is appended
ENV_DISABLED = "OTEL_SDK_DISABLED"                           # "true": off, whatever else is set
TRACES_PATH = "/v1/traces"
TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"

# What every span of the mesh may carry besides OpenTelemetry's rpc.* attributes. Never an API key, a prompt
# or a header: the tenant is the digest of the key (services/gateway/tenancy.py).
JOB_ID = "t2v.job_id"
TENANT = "t2v.tenant"

_PROPAGATOR = TraceContextTextMapPropagator()
# OpenTelemetry's W3C parsing warns about a malformed traceparent or tracestate by quoting it: text a caller
# controls, a log line per request. A malformed header only starts a trace of its own, so they stay quiet.
for _quoting in ("opentelemetry.trace.propagation.tracecontext", "opentelemetry.trace.span"):
    logging.getLogger(_quoting).setLevel(logging.ERROR)
# gRPC status codes that make a server span an error (OpenTelemetry's RPC conventions): the others are the
# client's doing (INVALID_ARGUMENT, NOT_FOUND, ...) and are an error of the client's span only.
_SERVER_ERRORS = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                            grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                            grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


def traces_url(configured: str = "", environ: Mapping[str, str] | None = None) -> str:
    """Where spans go: ``configured`` (--otlp-endpoint, a base URL such as http://collector:4318, or the full
    .../v1/traces URL), else OTEL_EXPORTER_OTLP_TRACES_ENDPOINT as it is, else OTEL_EXPORTER_OTLP_ENDPOINT +
    /v1/traces; "" = tracing off (also when OTEL_SDK_DISABLED=true). A URL that is not http(s) raises
    ValueError naming the setting."""
    env = os.environ if environ is None else environ
    if env.get(ENV_DISABLED, "").strip().lower() == "true":
        return ""
    for value, name, full in [(configured, "--otlp-endpoint (T2V_OTLP_ENDPOINT)", False),
                              (env.get(ENV_TRACES_ENDPOINT, ""), ENV_TRACES_ENDPOINT, True),
                              (env.get(ENV_ENDPOINT, ""), ENV_ENDPOINT, False)]:
        url = value.strip()
        if not url:
            continue
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{name} is {url!r}; it must be the http:// or https:// URL of an OTLP/HTTP "
                             "receiver, e.g. http://otel-collector:4318 (or unset, for no traces)")
        if full:
            return url
        url = url.rstrip("/")
        return url if url.endswith(TRACES_PATH) else url + TRACES_PATH
    return ""


def _ns(ms: int) -> int:
    return int(ms) * 1_000_000


def _preset_ids() -> Any:
    """The SDK's random id generator, except inside ``preset(trace_id, span_id)``: how a job's root span
    gets the ids its children already name (the SDK draws ids itself, and has no other way to be told)."""
    from opentelemetry.sdk.trace.id_generator import RandomIdGenerator

    class PresetIds(RandomIdGenerator):
        def __init__(self) -> None:
            self._preset: contextvars.ContextVar[tuple[int, int] | None] = contextvars.ContextVar(
                "t2v_preset_ids", default=None)

        def generate_trace_id(self) -> int:
            preset = self._preset.get()
            return preset[0] if preset is not None else super().generate_trace_id()

        def generate_span_id(self) -> int:
            preset = self._preset.get()
            return preset[1] if preset is not None else super().generate_span_id()

        @contextlib.contextmanager
        def preset(self, trace_id: int, span_id: int) -> Iterator[None]:
            token = self._preset.set((trace_id, span_id))
            try:
                yield
            finally:
                self._preset.reset(token)

    return PresetIds()


class Tracing:
    """One service's tracer. ``Tracing.for_service(name, endpoint)`` starts the SDK (a provider with the
    service's name, a batch processor, an OTLP/HTTP exporter) when an endpoint is configured; otherwise it
    is ``Tracing.off()``: the API's no-op tracer, and ``enabled`` False. Whoever records spans checks
    ``enabled`` first, so an untraced service does no tracing work at all."""

    def __init__(self, tracer: trace.Tracer | None = None, provider: Any = None, url: str = "",
                 service: str = "", ids: Any = None) -> None:
        self.tracer: trace.Tracer = tracer if tracer is not None else trace.NoOpTracer()
        self.url = url
        self.service = service
        self._provider = provider
        self._ids = ids
        self._closed = threading.Event()

    @classmethod
    def off(cls) -> "Tracing":
        return cls()

    @classmethod
    def for_service(cls, service: str, endpoint: str = "") -> "Tracing":
        """``service`` is the ``service.name`` of every span (t2v-gateway, t2v-denoiser, ...)."""
        url = traces_url(endpoint)
        if not url:
            return cls.off()
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        ids = _preset_ids()
        # OTEL_RESOURCE_ATTRIBUTES adds to these (deployment.environment, k8s.pod.name, ...); our names win
        provider = TracerProvider(resource=Resource.create({"service.name": service, "service.namespace": "t2v-mesh"}),
                                  id_generator=ids)
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
        return cls(provider.get_tracer("t2v-mesh"), provider, url, service, ids)

    @property
    def enabled(self) -> bool:
        return self._provider is not None and not self._closed.is_set()

    # --- spans -------------------------------------------------------------------------------------------
    def start_span(self, name: str, parent: "str | otel_context.Context | None" = None,
                   kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None,
                   start_ms: int | None = None) -> Span:
        """A span under ``parent`` (a stored traceparent, a Context, or None = the current context); end it."""
        context = self.context_of(parent) if isinstance(parent, str) else parent
        return self.tracer.start_span(name, context=context, kind=kind, attributes=dict(attributes or {}),
                                      start_time=_ns(start_ms) if start_ms is not None else None)

    def record_span(self, name: str, parent: str, start_ms: int, end_ms: int,
                    attributes: Mapping[str, Any] | None = None) -> None:
        """A span whose times are known already (a queue wait: from the job's admission to its claim)."""
        span = self.start_span(name, parent, attributes=attributes, start_ms=start_ms)
        span.end(end_time=_ns(max(start_ms, end_ms)))

    def record_root(self, traceparent: str, name: str, start_ms: int, end_ms: int,
                    attributes: Mapping[str, Any], status: Status,
                    events: Sequence[tuple[str, int, Mapping[str, Any]]] = ()) -> bool:
        """Record the root span that ``traceparent`` (from ``new_root``) names, now that it ended; False when
        the traceparent is malformed or not sampled. ``events``: (name, unix ms, attributes)."""
        parent = trace.get_current_span(self.context_of(traceparent)).get_span_context()
        if not parent.is_valid or not parent.trace_flags.sampled or self._ids is None:
            return False
        with self._ids.preset(parent.trace_id, parent.span_id):
            span = self.tracer.start_span(name, context=otel_context.Context(), kind=SpanKind.INTERNAL,
                                          attributes=dict(attributes), start_time=_ns(start_ms))
        for event, at_ms, event_attributes in events:
            span.add_event(event, dict(event_attributes), timestamp=_ns(at_ms))
        span.set_status(status)
        span.end(end_time=_ns(max(start_ms, end_ms)))
        return True

    def new_root(self, name: str) -> str:
        """A traceparent for a root span recorded later (``record_root``): fresh ids, and this provider's
        sampler's decision for them, so the children and the root agree on whether the trace is kept."""
        trace_id = random.getrandbits(128) or 1
        span_id = random.getrandbits(64) or 1
        sampled = True
        if self._provider is not None:
            sampled = self._provider.sampler.should_sample(otel_context.Context(), trace_id, name).decision.is_sampled()
        return f"00-{trace_id:032x}-{span_id:016x}-{'01' if sampled else '00'}"

    # --- context -----------------------------------------------------------------------------------------
    @staticmethod
    def context_of(traceparent: str) -> otel_context.Context:
        """A Context whose current span is the one ``traceparent`` names (an empty Context if malformed)."""
        return _PROPAGATOR.extract({TRACEPARENT: traceparent})

    @staticmethod
    def metadata(span: Span) -> tuple[tuple[str, str], ...]:
        """gRPC metadata that carries ``span`` as the caller: ``traceparent`` (and ``tracestate``)."""
        carrier: dict[str, str] = {}
        _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
        return tuple(carrier.items())

    @contextlib.contextmanager
    def current(self, traceparent: str) -> Iterator[None]:
        """Make the span ``traceparent`` names the current one in this thread (spans started here are its
        children); does nothing when tracing is off or ``traceparent`` is empty."""
        if not self.enabled or not traceparent:
            yield
            return
        token = otel_context.attach(self.context_of(traceparent))
        try:
            yield
        finally:
            otel_context.detach(token)

    # --- life --------------------------------------------------------------------------------------------
    def flush(self, timeout_seconds: float = 10.0) -> bool:
        """Export every span ended so far (blocking; the SDK bounds it by the exporter's own timeout, 10 s by
        default, whatever ``timeout_seconds`` says); False once shut down."""
        if self._provider is None:
            return True
        return bool(self._provider.force_flush(int(timeout_seconds * 1000)))

    def shutdown(self) -> None:
        """Export what is left and stop the exporter's thread (once; later spans are dropped)."""
        if self._provider is None or self._closed.is_set():
            return
        self._closed.set()
        self._provider.shutdown()


def rpc_attributes(full_method: str) -> dict[str, str]:
    """OpenTelemetry's rpc.* attributes of "/t2v.v1.Denoiser/Denoise"."""
    service, _, method = full_method.lstrip("/").rpartition("/")
    return {"rpc.system": "grpc", "rpc.service": service, "rpc.method": method}


def trace_carrier(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The W3C trace fields of a call's headers or metadata (names in any case) as the propagator reads
    them: a ``traceparent`` sent more than once is none (which one was meant cannot be known: the call starts
    a trace of its own), ``tracestate`` fields are joined in order, as W3C Trace Context says. For gRPC
    metadata and HTTP headers alike (services/gateway/http_spans.py)."""
    found: dict[str, list[str]] = {}
    for name, value in pairs:
        name = name.lower() if isinstance(name, str) else ""
        if name in (TRACEPARENT, TRACESTATE) and isinstance(value, str):
            found.setdefault(name, []).append(value)
    parents = found.get(TRACEPARENT, [])
    if len(parents) != 1:
        return {}
    carrier = {TRACEPARENT: parents[0]}
    if found.get(TRACESTATE):
        carrier[TRACESTATE] = ",".join(found[TRACESTATE])
    return carrier


def span_name(full_method: str) -> str:
    """"/t2v.v1.Denoiser/Denoise" -> "t2v.v1.Denoiser/Denoise" (the RPC conventions' span name)."""
    return full_method.lstrip("/")


class TraceInterceptor(grpc.ServerInterceptor):
    """A SERVER span for every call (health and reflection aside), child of the caller's span when the call
    carries a ``traceparent`` in its metadata (the gateway's stage calls do), with the rpc.* attributes, the
    job id when the request has one (``request_id``) and the status code. Installed only when tracing is on.

    The span is the current one while the handler runs (for a stream: while it makes each message), so what
    the handler records joins it."""

    _UNTRACED = ("/grpc.health.v1.", "/grpc.reflection.")

    def __init__(self, tracing: Tracing) -> None:
        self.tracing = tracing

    def _start(self, method: str, metadata: Any, request: Any) -> tuple[Span, otel_context.Context]:
        parent = _PROPAGATOR.extract(trace_carrier(metadata or ()))
        attributes: dict[str, Any] = rpc_attributes(method)
        job_id = getattr(request, "request_id", "")
        if isinstance(job_id, str) and job_id:
            attributes[JOB_ID] = job_id
        span = self.tracing.tracer.start_span(span_name(method), context=parent, kind=SpanKind.SERVER,
                                              attributes=attributes)
        return span, trace.set_span_in_context(span, parent)

    @staticmethod
    def _end(span: Span, context: grpc.ServicerContext, error: BaseException | None) -> None:
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
        if isinstance(error, GeneratorExit):
            code = grpc.StatusCode.CANCELLED          # the client went away between two messages
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            details = context.details() if hasattr(context, "details") else None
            text = details.decode(errors="replace") if isinstance(details, bytes) else (details or code.name)
            span.set_status(Status(StatusCode.ERROR, text))
        span.end()

    def _unary(self, behaviour: Callable, method: str, metadata: Any) -> Callable:
        def call(request: Any, context: grpc.ServicerContext) -> Any:
            span, ctx = self._start(method, metadata, request)
            token = otel_context.attach(ctx)
            error: BaseException | None = None
            try:
                return behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                otel_context.detach(token)
                self._end(span, context, error)
        return call

    def _stream(self, behaviour: Callable, method: str, metadata: Any) -> Callable:
        def call(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            span, ctx = self._start(method, metadata, request)
            error: BaseException | None = None
            try:
                token = otel_context.attach(ctx)
                try:
                    messages = iter(behaviour(request, context))
                finally:
                    otel_context.detach(token)
                while True:
                    token = otel_context.attach(ctx)  # only around the handler's own work: never across a yield
                    try:
                        message = next(messages)
                    except StopIteration:
                        return
                    finally:
                        otel_context.detach(token)
                    yield message
            except BaseException as exc:
                error = exc
                raise
            finally:
                self._end(span, context, error)
        return call

    def intercept_service(self, continuation, handler_call_details):  # noqa: ANN001 - gRPC's signature
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method.startswith(self._UNTRACED) or not self.tracing.enabled:
            return handler
        metadata = handler_call_details.invocation_metadata
        kinds = [("unary_unary", grpc.unary_unary_rpc_method_handler, self._unary),
                 ("unary_stream", grpc.unary_stream_rpc_method_handler, self._stream),
                 ("stream_unary", grpc.stream_unary_rpc_method_handler, self._unary),
                 ("stream_stream", grpc.stream_stream_rpc_method_handler, self._stream)]
        for name, make, wrap in kinds:
            behaviour = getattr(handler, name)
            if behaviour is not None:
                return make(wrap(behaviour, method, metadata), request_deserializer=handler.request_deserializer,
                            response_serializer=handler.response_serializer)
        return handler
