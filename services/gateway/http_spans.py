"""A SERVER span for every request to the gateway's HTTP API, as its gRPC API has (common/tracing.py).

Why: a backend team that calls ``POST /v1/videos`` from a traced service sends a W3C ``traceparent``
header and expects the call in its trace, as a gRPC caller gets with ``traceparent`` metadata. The span is
the child of that header's span (a trace of its own without one), named by OpenTelemetry's HTTP
conventions (``POST /v1/videos``: the method and the route template, never the raw path), and carries
the job it made or read (``t2v.job_id``); the job itself stays its own trace (its root is recorded at its
end, possibly by another gateway), joined to this span by that id, as for gRPC. No header, query,
body, key or raw path (``url.path``, which the conventions ask for, would carry every video id; the job id
is an attribute of its own) is recorded; the caller's ``tracestate`` goes on with its trace, as W3C
requires. Installed only when tracing is on; outermost, so refusals (401, 429) are spans too.
"""

from __future__ import annotations

from typing import Any, Iterable

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from services.common.tracing import JOB_ID, Tracing, trace_carrier
from services.gateway.answers import AnswerWatch
from services.gateway.domain import JOB_ID_PATTERN
from services.gateway.metrics import HTTP_METHODS, OTHER, route_template

_PROPAGATOR = TraceContextTextMapPropagator()
# OpenTelemetry's known methods; another is "_OTHER" (its span named "HTTP"), the method as sent kept apart
KNOWN_METHODS = frozenset({*HTTP_METHODS, "CONNECT", "TRACE"})


def header_carrier(headers: Iterable[tuple[bytes, bytes]]) -> dict[str, str]:
    """``trace_carrier`` of an ASGI request's headers (bytes, latin-1 as HTTP/1.1 sends them)."""
    return trace_carrier((name.decode("latin-1"), value.decode("latin-1")) for name, value in headers)


def span_name(method: str, route: str) -> str:
    """OpenTelemetry's HTTP server span name: "GET /v1/videos/{video_id}", the method alone off any route,
    "HTTP" for a method it does not know."""
    if method not in KNOWN_METHODS:
        return "HTTP"
    return method if route == OTHER else f"{method} {route}"


class HttpRequestSpans:
    """ASGI middleware: one SERVER span per HTTP request, current while the app answers it (so the job it
    submits names it), ended when its answer ends (answers.py, as the metrics count it) or when the app
    ends without one. Status ERROR, with ``error.type``, for a 5xx answer and for none at all."""

    def __init__(self, app: Any, tracing: Tracing, routes: Iterable[Any] = ()) -> None:
        self.app = app
        self.tracing = tracing
        self.routes = [r for r in routes if isinstance(getattr(r, "path", None), str)]

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or not self.tracing.enabled:
            await self.app(scope, receive, send)
            return
        parent = _PROPAGATOR.extract(header_carrier(scope.get("headers", ())))
        sent_method = str(scope["method"])
        method = sent_method if sent_method in KNOWN_METHODS else "_OTHER"
        attributes = {"http.request.method": method, "url.scheme": scope.get("scheme", "http"),
                      "network.protocol.version": scope.get("http_version", "")}
        if method == "_OTHER":
            attributes["http.request.method_original"] = sent_method[:32]
        span = self.tracing.tracer.start_span(span_name(method, OTHER), context=parent, kind=SpanKind.SERVER,
                                              attributes=attributes)

        def end(status: int) -> None:
            route = route_template(scope, self.routes)
            span.update_name(span_name(method, route))
            if route != OTHER:
                span.set_attribute("http.route", route)
            video_id = (scope.get("path_params") or {}).get("video_id")
            if isinstance(video_id, str) and JOB_ID_PATTERN.fullmatch(video_id):
                span.set_attribute(JOB_ID, video_id)
            if status:
                span.set_attribute("http.response.status_code", status)
            if status >= 500 or not status:
                error = str(status) if status else "no_answer"      # the client left before an answer
                span.set_attribute("error.type", error)
                span.set_status(Status(StatusCode.ERROR, error))
            span.end()

        answer = AnswerWatch(send, end)
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        try:
            await answer.serve(self.app, scope, receive)
        finally:
            otel_context.detach(token)
