"""The W3C trace headers an HTTP request carries, as the gateway's HTTP spans read them
(services/gateway/http_spans.py), and the log lines a malformed one no longer causes."""

from __future__ import annotations

import logging

import pytest

from services.common.tracing import Tracing
from services.gateway.http_spans import header_carrier, span_name

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
OTHER = "00-1af7651916cd43dd8448eb211c80319c-c7ad6b7169203331-01"


def test_one_traceparent_is_the_parent_and_tracestate_headers_are_joined_in_order() -> None:
    headers = [(b"traceparent", PARENT.encode()), (b"Tracestate", b"a=1"), (b"content-type", b"x"),
               (b"tracestate", b"b=2")]
    assert header_carrier(headers) == {"traceparent": PARENT, "tracestate": "a=1,b=2"}
    assert header_carrier([(b"TRACEPARENT", PARENT.encode())]) == {"traceparent": PARENT}
    assert header_carrier([(b"tracestate", b"a=1")]) == {}                     # no parent: nothing to continue


def test_a_traceparent_sent_twice_is_none() -> None:
    """Which was meant cannot be known (W3C's test suite: a new trace); the last one used to win."""
    assert header_carrier([(b"traceparent", PARENT.encode()), (b"traceparent", OTHER.encode())]) == {}
    assert header_carrier([(b"traceparent", PARENT.encode())] * 2) == {}


def test_span_names_follow_the_http_conventions() -> None:
    assert span_name("POST", "/v1/videos") == "POST /v1/videos"
    assert span_name("GET", "other") == "GET"
    assert span_name("_OTHER", "/v1/videos") == "HTTP"


def test_a_malformed_trace_header_leaves_no_log_line_quoting_it(caplog: pytest.LogCaptureFixture) -> None:
    """OpenTelemetry's parser warned with the header's text: a client could write a line per request into the
    gateway's log. It is quiet now (a malformed header only starts a trace of its own)."""
    with caplog.at_level(logging.DEBUG):
        context = Tracing.context_of("00-zz-not-a-trace-id-01" + "x" * 600)
        from opentelemetry.trace import TraceState

        TraceState.from_header(["a=\u00e9\u00ff", "k" * 300 + "=v"])
    assert context is not None
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text


def test_a_grpc_call_with_traceparent_twice_starts_a_trace_of_its_own() -> None:
    """The stages' SERVER spans read gRPC metadata as the gateway reads HTTP headers (the last traceparent
    used to win); one traceparent is still the parent."""
    from opentelemetry.sdk.trace import TracerProvider

    from services.common.tracing import TraceInterceptor

    interceptor = TraceInterceptor(Tracing(TracerProvider().get_tracer("test")))
    request = type("Request", (), {"request_id": "job-1"})()
    twice, _ = interceptor._start("/t2v.v1.TextEncoder/Encode", [("traceparent", PARENT), ("traceparent", OTHER)],
                                  request)
    once, _ = interceptor._start("/t2v.v1.TextEncoder/Encode", [("traceparent", OTHER), ("tracestate", "a=1")],
                                 request)
    assert twice.parent is None
    assert once.parent is not None and once.parent.trace_id == int(OTHER.split("-")[1], 16)
    assert once.get_span_context().trace_state.get("a") == "1"
    for span in (twice, once):
        span.end()
