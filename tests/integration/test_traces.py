"""Traces across the mesh (issue 17), checked on a real OTLP/HTTP receiver on loopback.

The receiver is a small ``http.server`` that takes POST /v1/traces, decodes the protobuf
ExportTraceServiceRequest with opentelemetry-proto and keeps every span with its service's name. A real job
goes through a gateway and the three stages, each with its own tracing: the denoiser and the decoder in this
process (each service has its own provider, so its own ``service.name``), the text encoder as a process of its
own (``t2v serve text_encoder --otlp-endpoint ...``: the way a deployment runs, flushed when it stops). The job
must be one trace: its root span, the queue wait and a client span per stage call as the root's children, and
each stage's server span as the child of the gateway's client span; the job id and the tenant on the gateway's
spans, and the API key nowhere in anything exported. A job taken over by a second gateway (SQLite after a
restart, PostgreSQL between two running gateways) stays in the same trace; a retried stage call is one client
span with a retry event and a server span per attempt. With no endpoint, nothing is exported, the SDK is not
even imported and no exporter thread runs.
"""

from __future__ import annotations

import gzip
import http.server
import json
import os
import signal
import subprocess
import sys
import threading
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from services.common.tracing import TRACES_PATH, traces_url
from services.denoiser.server import SERVICE_NAME as DENOISER_SERVICE
from services.gateway.tenancy import tenant_of
from t2v.v1 import denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import (RunningStage, ServiceProcess, http_call, start_decoder, start_denoiser, start_gateway,
                            start_stage, start_text_encoder, stop_gateway, stop_stage, wait_for)

pytestmark = pytest.mark.slow

S = gateway_pb2
API_KEY = "sk-trace-test-0123456789abcdef-never-exported"
SMALL = dict(num_frames=2, height=32, width=32)
KIND_SERVER, KIND_CLIENT = trace_pb2.Span.SPAN_KIND_SERVER, trace_pb2.Span.SPAN_KIND_CLIENT
STATUS_OK, STATUS_ERROR = trace_pb2.Status.STATUS_CODE_OK, trace_pb2.Status.STATUS_CODE_ERROR
STAGE_CALLS = {"t2v.v1.TextEncoder/Encode": "t2v-text-encoder", "t2v.v1.Denoiser/Denoise": "t2v-denoiser",
               "t2v.v1.Decoder/Decode": "t2v-decoder"}


# --- the receiver -----------------------------------------------------------------------------------------
def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: _value(kv.value) for kv in any_value.kvlist_value.values}
    return getattr(any_value, kind) if kind else None


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


@dataclass
class Span:
    service: str
    resource: dict[str, Any]
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_id: str
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    events: list[tuple[str, dict[str, Any]]]
    status: int
    status_message: str


@dataclass
class Receiver:
    """An OTLP/HTTP trace receiver on 127.0.0.1: every span it was sent, and every body as it came."""

    server: http.server.ThreadingHTTPServer
    spans: list[Span] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def take(self, body: bytes) -> None:
        request = trace_service_pb2.ExportTraceServiceRequest()
        request.ParseFromString(body)
        found = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    found.append(Span(
                        service=str(resource.get("service.name", "")), resource=resource, name=span.name,
                        kind=span.kind, trace_id=span.trace_id.hex(), span_id=span.span_id.hex(),
                        parent_id=span.parent_span_id.hex(), start_ns=span.start_time_unix_nano,
                        end_ns=span.end_time_unix_nano, attributes=_attributes(span.attributes),
                        events=[(event.name, _attributes(event.attributes)) for event in span.events],
                        status=span.status.code, status_message=span.status.message))
        with self.lock:
            self.bodies.append(body)
            self.spans.extend(found)

    def trace(self, trace_id: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.trace_id == trace_id]

    def named(self, name: str) -> list[Span]:
        with self.lock:
            return [span for span in self.spans if span.name == name]


def _handler(receiver_ref: list[Receiver]) -> type[http.server.BaseHTTPRequestHandler]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            encoding = self.headers.get("Content-Encoding", "")
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            if self.path != TRACES_PATH or self.headers.get("Content-Type") != "application/x-protobuf":
                self.send_error(404 if self.path != TRACES_PATH else 415)
                return
            try:
                receiver_ref[0].take(body)
            except Exception:  # noqa: BLE001 - a body that is not an ExportTraceServiceRequest
                self.send_error(400)
                return
            answer = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: Any) -> None:
            pass
    return Handler


def start_receiver() -> Receiver:
    ref: list[Receiver] = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _handler(ref))
    ref.append(Receiver(server))
    threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True).start()
    return ref[0]


# --- the mesh -------------------------------------------------------------------------------------------
@dataclass
class Mesh:
    receiver: Receiver
    text_encoder: RunningStage
    denoiser: RunningStage
    decoder: RunningStage


@pytest.fixture(scope="module")
def mesh() -> Iterator[Mesh]:
    """A receiver, and the three stages in this process, each tracing to it under its own service name."""
    receiver = start_receiver()
    stages = [start(otlp_endpoint=receiver.endpoint)
              for start in (start_text_encoder, start_denoiser, start_decoder)]
    yield Mesh(receiver, *stages)
    for stage in stages:
        stop_stage(stage)
        stage.servicer.tracing.shutdown()
    receiver.server.shutdown()


@pytest.fixture
def keys_file(tmp_path: Path) -> str:
    path = tmp_path / "keys"
    path.write_text(API_KEY + "\n")
    return str(path)


METADATA = (("authorization", f"Bearer {API_KEY}"),)


def submit(gateway: RunningStage, steps: int = 4, **extra: Any) -> str:
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    params = generation_pb2.GenerationParams(prompt="a red ball", num_inference_steps=steps, **SMALL)
    return stub.SubmitJob(S.SubmitJobRequest(params=params, **extra), metadata=METADATA, timeout=30).job_id


def job(gateway: RunningStage, job_id: str) -> gateway_pb2.Job:
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    return stub.GetJob(S.GetJobRequest(job_id=job_id), metadata=METADATA, timeout=10)


def completed(gateway: RunningStage, job_id: str, timeout: float = 180) -> gateway_pb2.Job:
    done = wait_for(lambda: (j := job(gateway, job_id)).status not in (S.JOB_STATUS_QUEUED, S.JOB_STATUS_RUNNING)
                    and j, timeout, f"job {job_id} to end")
    assert done.status == S.JOB_STATUS_COMPLETED, done
    return done


def trace_ids(traceparent: str) -> tuple[str, str]:
    _version, trace_id, span_id, _flags = traceparent.split("-")
    return trace_id, span_id


def flush(*services: Any) -> None:
    for service in services:
        assert service.tracing.flush(10), f"{service.tracing.service} did not export within 10 s"


def assert_no_key_anywhere(receiver: Receiver) -> None:
    """The API key is in no byte sent to the receiver: no attribute, event, status or resource holds it."""
    with receiver.lock:
        bodies, spans = list(receiver.bodies), list(receiver.spans)
    assert bodies
    for body in bodies:
        assert API_KEY.encode() not in body
    for span in spans:
        texts = [json.dumps(span.attributes), json.dumps(span.resource), json.dumps(span.events), span.status_message]
        assert not any(API_KEY in text for text in texts), span


def assert_connected(spans: list[Span], root: Span) -> None:
    """One tree: every span of the trace but the root has its parent in the trace."""
    ids = {span.span_id for span in spans}
    assert len(ids) == len(spans), "span ids are unique"
    for span in spans:
        if span is not root:
            assert span.parent_id in ids, f"{span.service} {span.name} has a parent outside the trace"


# --- the tests ----------------------------------------------------------------------------------------------
def test_a_job_is_one_trace_from_admission_to_the_stored_video(
        mesh: Mesh, spawn: Callable[..., ServiceProcess], keys_file: str) -> None:
    receiver = mesh.receiver
    # the text encoder as a process of its own: its spans leave with its own service name, on its stop
    encoder = spawn("text_encoder", "--otlp-endpoint", receiver.endpoint).wait_serving()
    gateway = start_gateway(encoder.address, mesh.denoiser.address, mesh.decoder.address,
                            otlp_endpoint=receiver.endpoint, api_keys_file=keys_file, checkpoint_every=2)
    try:
        job_id = submit(gateway, steps=4)
        done = completed(gateway, job_id)
        record = gateway.servicer.jobs.store.get(job_id)
        flush(gateway.servicer, mesh.denoiser.servicer, mesh.decoder.servicer)
    finally:
        stop_gateway(gateway)
    encoder.signal(signal.SIGTERM)               # a clean stop exports what its batch still holds
    assert encoder.proc.wait(timeout=60) == 0, encoder.log()[-3000:]
    assert "event=tracing service_name=t2v-text-encoder" in encoder.log()

    trace_id, root_span_id = trace_ids(record.trace_parent)
    spans = wait_for(lambda: (found := receiver.trace(trace_id)) and len(found) >= 9 and found, 30,
                     "the job's spans (root, queue wait, 3 client and 3 server spans, store) at the receiver")
    by_name: dict[str, list[Span]] = {}
    for span in spans:
        by_name.setdefault(span.name, []).append(span)
    tenant = tenant_of(API_KEY)

    [root] = by_name["job"]
    assert root.parent_id == "" and root.span_id == root_span_id and root.service == "t2v-gateway"
    assert root.attributes["t2v.job_id"] == job_id and root.attributes["t2v.tenant"] == tenant
    assert root.attributes["t2v.status"] == "completed" and root.status == STATUS_OK
    assert root.attributes["t2v.runs"] == 1 and root.attributes["t2v.cached"] is False
    assert root.start_ns == record.created_ms * 1_000_000 and root.end_ns == record.finished_ms * 1_000_000
    assert [name for name, _ in root.events] == ["claimed"]

    [queued] = by_name["queue_wait"]
    assert queued.parent_id == root.span_id and queued.service == "t2v-gateway"
    assert queued.attributes["t2v.job_id"] == job_id and queued.attributes["t2v.tenant"] == tenant
    assert queued.start_ns == record.created_ms * 1_000_000 <= queued.end_ns <= root.end_ns

    [stored] = by_name["store_video"]
    assert stored.parent_id == root.span_id and stored.attributes["t2v.video_bytes"] == done.video_size

    previous_end = queued.end_ns
    for name, stage_service in STAGE_CALLS.items():
        [client] = [span for span in by_name[name] if span.kind == KIND_CLIENT]
        [server] = [span for span in by_name[name] if span.kind == KIND_SERVER]
        assert client.service == "t2v-gateway" and client.parent_id == root.span_id, name
        assert client.attributes["t2v.job_id"] == job_id and client.attributes["rpc.grpc.status_code"] == 0
        assert client.attributes["rpc.system"] == "grpc" and client.status != STATUS_ERROR
        assert client.start_ns >= previous_end, f"{name} starts after what came before it"
        previous_end = client.end_ns
        # the stage's own span, in its own process or provider, continues the trace from the metadata
        assert server.service == stage_service and server.parent_id == client.span_id, name
        assert server.attributes["t2v.job_id"] == job_id and server.attributes["rpc.grpc.status_code"] == 0
        assert client.start_ns <= server.start_ns and server.end_ns <= client.end_ns + 50_000_000
    assert stored.start_ns >= previous_end

    [denoise] = [span for span in by_name["t2v.v1.Denoiser/Denoise"] if span.kind == KIND_CLIENT]
    assert [(name, attrs["t2v.step"]) for name, attrs in denoise.events] == [("checkpoint", 2)]
    assert_connected(spans, root)
    assert all(span.service != "t2v-gateway" or span.resource.get("service.namespace") == "t2v-mesh"
               for span in spans)

    # the SubmitJob call is a span of the gateway too (its own trace: the client sent no traceparent), and it
    # names the job it made
    [call] = [span for span in receiver.named("t2v.v1.Gateway/SubmitJob") if span.kind == KIND_SERVER]
    assert call.attributes["t2v.job_id"] == job_id and call.trace_id != trace_id
    assert not receiver.named("grpc.health.v1.Health/Check")      # probes are not traced
    assert_no_key_anywhere(receiver)


@pytest.mark.parametrize("job_store", ["sqlite", "postgresql"])
def test_a_job_taken_over_by_another_gateway_stays_in_its_trace(
        mesh: Mesh, keys_file: str, tmp_path: Path, job_store: str, request: pytest.FixtureRequest) -> None:
    """The first gateway stops in mid-denoise (its job is released, with a checkpoint); the next one, on the same
    job store, finishes the job: every span of both runs, and the root the second records, share one trace.
    SQLite: the next gateway opens the state dir after the first closed it. PostgreSQL: the second gateway runs
    beside the first and takes the job over the moment the first lets it go."""
    receiver = mesh.receiver
    store = {"state_dir": str(tmp_path / "state")} if job_store == "sqlite" else {
        "job_store": request.getfixturevalue("postgres_dsn"), "state_dir": str(tmp_path / "unused")}
    stages = (mesh.text_encoder.address, mesh.denoiser.address, mesh.decoder.address)
    first = start_gateway(*stages, otlp_endpoint=receiver.endpoint, api_keys_file=keys_file, checkpoint_every=3,
                          **store)
    second = None
    try:
        job_id = submit(first, steps=60)
        wait_for(lambda: job(first, job_id).progress.step >= 5, 120, "the job to pass its first checkpoint")
        traceparent = first.servicer.jobs.store.get(job_id).trace_parent
        if job_store == "postgresql":
            second = start_gateway(*stages, otlp_endpoint=receiver.endpoint, api_keys_file=keys_file, **store)
    finally:
        stop_gateway(first)                         # flushes its spans on the way out
    engine = mesh.denoiser.servicer.engine
    if second is None:
        wait_for(lambda: engine.active_jobs() == 0, 30, "the denoiser to drop the first gateway's request")
        second = start_gateway(*stages, otlp_endpoint=receiver.endpoint, api_keys_file=keys_file, **store)
    try:
        completed(second, job_id, timeout=300)
        record = second.servicer.jobs.store.get(job_id)
        flush(second.servicer, mesh.denoiser.servicer)
    finally:
        stop_gateway(second)
    assert record.trace_parent == traceparent and record.runs == 2

    trace_id, root_span_id = trace_ids(traceparent)
    spans = wait_for(lambda: (found := receiver.trace(trace_id)) and any(s.name == "job" for s in found) and found,
                     30, "the job's root at the receiver")
    [root] = [span for span in spans if span.name == "job"]
    assert root.span_id == root_span_id and root.attributes["t2v.runs"] == 2 and root.status == STATUS_OK
    assert [name for name, _ in root.events] == ["taken_over"]
    resumed_from = root.events[0][1]["t2v.resumed_from_step"]
    assert resumed_from >= 3 and resumed_from % 3 == 0
    assert len([span for span in spans if span.name == "queue_wait"]) == 1     # one admission, one queue wait
    denoises = [span for span in spans if span.name == "t2v.v1.Denoiser/Denoise" and span.kind == KIND_CLIENT]
    assert len(denoises) == 2 and all(span.parent_id == root.span_id for span in denoises)
    interrupted, resumed = sorted(denoises, key=lambda span: span.start_ns)
    assert interrupted.attributes["t2v.error_code"] in ("CANCELLED", "UNAVAILABLE")
    assert ("resume", {"t2v.step": resumed_from}) in resumed.events
    assert resumed.attributes["rpc.grpc.status_code"] == 0
    servers = [span for span in spans if span.name == "t2v.v1.Denoiser/Denoise" and span.kind == KIND_SERVER]
    assert {span.parent_id for span in servers} == {interrupted.span_id, resumed.span_id}
    assert_connected(spans, root)
    assert_no_key_anywhere(receiver)


class FlakyDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    """The mesh's denoiser, except that its first call breaks after its first message, as when a replica is
    killed mid-call: gRPC's own retry policy cannot retry that, the orchestrator does."""

    def __init__(self, real: Any) -> None:
        self.real, self.config, self.gate, self.tracing = real, real.config, real.gate, real.tracing
        self.calls = 0

    def load(self) -> None:
        """The real denoiser is loaded already."""

    def Denoise(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:  # noqa: N802 - gRPC's name
        self.calls += 1
        events = self.real.Denoise(request, context)
        if self.calls == 1:
            yield next(events)
            events.close()
            context.abort(grpc.StatusCode.UNAVAILABLE, "the replica went away")
        yield from events


def test_a_retried_stage_call_is_one_client_span_with_a_retry_event_and_a_server_span_per_attempt(
        mesh: Mesh, keys_file: str) -> None:
    receiver = mesh.receiver
    flaky = start_stage(FlakyDenoiser(mesh.denoiser.servicer), DENOISER_SERVICE,
                        denoiser_pb2_grpc.add_DenoiserServicer_to_server)
    gateway = start_gateway(mesh.text_encoder.address, flaky.address, mesh.decoder.address,
                            otlp_endpoint=receiver.endpoint, api_keys_file=keys_file)
    try:
        job_id = submit(gateway)
        done = completed(gateway, job_id)
        record = gateway.servicer.jobs.store.get(job_id)
        flush(gateway.servicer, mesh.denoiser.servicer)
    finally:
        stop_gateway(gateway)
        flaky.server.stop(0)
    assert flaky.servicer.calls == 2 and any("trying again" in w for w in done.warnings)
    trace_id, _ = trace_ids(record.trace_parent)
    spans = wait_for(lambda: (found := [s for s in receiver.trace(trace_id) if s.name == "t2v.v1.Denoiser/Denoise"])
                     and len(found) >= 3 and found, 30, "the Denoise spans at the receiver")
    [client] = [span for span in spans if span.kind == KIND_CLIENT]
    assert [(name, attrs["t2v.attempt"]) for name, attrs in client.events] == [("retry", 2)]
    assert "the replica went away" in client.events[0][1]["t2v.reason"]
    assert client.attributes["t2v.attempts"] == 2 and client.attributes["rpc.grpc.status_code"] == 0
    assert client.status != STATUS_ERROR
    broken, ok = sorted((span for span in spans if span.kind == KIND_SERVER), key=lambda span: span.start_ns)
    assert broken.parent_id == ok.parent_id == client.span_id and broken.service == ok.service == "t2v-denoiser"
    assert broken.attributes["rpc.grpc.status_code"] == grpc.StatusCode.UNAVAILABLE.value[0]
    assert broken.status == STATUS_ERROR and "the replica went away" in broken.status_message
    assert ok.attributes["rpc.grpc.status_code"] == 0 and ok.status != STATUS_ERROR
    assert_no_key_anywhere(receiver)


def http_as_caller(gateway: RunningStage, method: str, path: str, body: dict | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """An HTTP API call with the test's key (``headers`` added, or replacing it)."""
    return http_call(gateway.http_url + path, method, body, {"Authorization": f"Bearer {API_KEY}", **(headers or {})})


def test_http_requests_are_server_spans_in_the_callers_trace_naming_their_job(mesh: Mesh, keys_file: str) -> None:
    """POST /v1/videos with the caller's traceparent is a SERVER span in the caller's trace, child of its span,
    named by route template, with the job it made; polls and the download name the job too; a request off any
    route, or refused (401), is a span with its status; no header, key or raw path in what is exported."""
    receiver = mesh.receiver
    gateway = start_gateway(mesh.text_encoder.address, mesh.denoiser.address, mesh.decoder.address,
                            otlp_endpoint=receiver.endpoint, api_keys_file=keys_file, http_port=0)
    caller_trace, caller_span = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    try:
        status, answer = http_as_caller(gateway, "POST", "/v1/videos", {"prompt": "a red ball", "size": "32x32",
                                                                     "num_frames": 2, "num_inference_steps": 2},
                                   headers={"traceparent": f"00-{caller_trace}-{caller_span}-01"})
        assert status == 200, answer
        video_id = json.loads(answer)["id"]
        wait_for(lambda: json.loads(http_as_caller(gateway, "GET", f"/v1/videos/{video_id}")[1])["status"]
                 in ("completed", "failed"), 120, "the video to finish")
        assert http_as_caller(gateway, "GET", f"/v1/videos/{video_id}/content")[0] == 200
        assert http_as_caller(gateway, "GET", "/no/such/page")[0] == 404
        assert http_as_caller(gateway, "GET", "/v1/videos", headers={"Authorization": "Bearer wrong"})[0] == 401
        record = gateway.servicer.jobs.store.get(video_id)
        flush(gateway.servicer)
    finally:
        stop_gateway(gateway)
    [post] = wait_for(lambda: receiver.named("POST /v1/videos"), 30, "the POST's span at the receiver")
    assert post.kind == KIND_SERVER and post.service == "t2v-gateway"
    assert (post.trace_id, post.parent_id) == (caller_trace, caller_span)          # in the caller's trace
    assert post.attributes["http.request.method"] == "POST" and post.attributes["http.route"] == "/v1/videos"
    assert post.attributes["http.response.status_code"] == 200 and post.status != STATUS_ERROR
    assert post.attributes["t2v.job_id"] == video_id                      # the job it made, as gRPC's SubmitJob
    assert post.trace_id != trace_ids(record.trace_parent)[0]             # the job is a trace of its own
    polls = [s for s in receiver.named("GET /v1/videos/{video_id}") if s.attributes.get("t2v.job_id") == video_id]
    assert polls and all(s.kind == KIND_SERVER and s.parent_id == "" and s.attributes["http.response.status_code"]
                         == 200 for s in polls)
    [content] = receiver.named("GET /v1/videos/{video_id}/content")
    assert content.attributes["t2v.job_id"] == video_id
    [lost] = [s for s in receiver.named("GET") if s.attributes.get("http.response.status_code") == 404]
    assert "http.route" not in lost.attributes and lost.status != STATUS_ERROR     # a 4xx is the client's
    refused = [s for s in receiver.named("GET /v1/videos") if s.attributes.get("http.response.status_code") == 401]
    assert len(refused) == 1
    with receiver.lock:
        bodies = list(receiver.bodies)
    assert not any(b"/no/such/page" in body or b"Bearer" in body or b"wrong" in body for body in bodies)
    assert_no_key_anywhere(receiver)


def test_with_no_endpoint_nothing_is_exported_and_no_exporter_runs(
        mesh: Mesh, keys_file: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "T2V_OTLP_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    receiver = mesh.receiver
    before = {thread.ident for thread in threading.enumerate()}
    gateway = start_gateway(mesh.text_encoder.address, mesh.denoiser.address, mesh.decoder.address,
                            api_keys_file=keys_file)
    try:
        tracing = gateway.servicer.tracing
        assert not tracing.enabled and type(tracing.tracer).__name__ == "NoOpTracer"
        job_id = submit(gateway)
        completed(gateway, job_id)
        assert gateway.servicer.jobs.store.get(job_id).trace_parent == ""       # nothing kept for a trace
        started = [t for t in threading.enumerate() if t.ident not in before]
        assert not [t.name for t in started if t.name.startswith("Otel")], started
        flush(mesh.text_encoder.servicer, mesh.denoiser.servicer, mesh.decoder.servicer)
    finally:
        stop_gateway(gateway)
    assert not [span for span in receiver.spans if span.attributes.get("t2v.job_id") == job_id
                and span.service == "t2v-gateway"]
    # the traced stages saw no traceparent: their spans of this job are roots of their own
    servers = [span for span in receiver.spans if span.attributes.get("t2v.job_id") == job_id]
    assert {span.service for span in servers} == set(STAGE_CALLS.values())
    assert all(span.parent_id == "" for span in servers)


def test_a_service_with_no_endpoint_imports_no_sdk_and_starts_no_thread(tmp_path: Path) -> None:
    """Off costs nothing, in a process of its own: the four services' objects built with no endpoint (and no
    OTEL_* variable) leave the SDK unimported and no exporter thread running."""
    script = """
import sys, threading
from services.gateway.app import Gateway, GatewayConfig
from services.text_encoder.server import TextEncoderConfig, TextEncoderServicer
from services.denoiser.server import DenoiserConfig, DenoiserServicer
from services.decoder.server import DecoderConfig, DecoderServicer
gateway = Gateway(GatewayConfig(state_dir=sys.argv[1]))
stages = [TextEncoderServicer(TextEncoderConfig()), DenoiserServicer(DenoiserConfig()), DecoderServicer(DecoderConfig())]
print("enabled", [s.tracing.enabled for s in [gateway, *stages]])
print("sdk", sorted(m for m in sys.modules if m.startswith(("opentelemetry.sdk", "opentelemetry.exporter"))))
print("threads", sorted(t.name for t in threading.enumerate()))
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "T2V_OTLP"))}
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "state")], capture_output=True, text=True,
                         timeout=300, env=env, cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["enabled"] == "[False, False, False, False]"
    assert lines["sdk"] == "[]"
    assert "Otel" not in lines["threads"], lines["threads"]
    # the same process with an endpoint: the SDK and its exporter thread are there (the check above can fail)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "state2")], capture_output=True, text=True,
                         timeout=300, env={**env, "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
                         cwd=str(Path(__file__).resolve().parents[2]))
    assert out.returncode == 0, out.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in out.stdout.strip().splitlines())
    assert lines["enabled"] == "[True, True, True, True]"
    assert "opentelemetry.sdk.trace" in lines["sdk"] and "OtelBatchSpanRecordProcessor" in lines["threads"]


def test_the_endpoint_settings() -> None:
    assert traces_url("", {}) == ""
    assert traces_url("http://collector:4318", {}) == "http://collector:4318/v1/traces"
    assert traces_url("http://collector:4318/v1/traces/", {}) == "http://collector:4318/v1/traces"
    assert traces_url("", {"OTEL_EXPORTER_OTLP_ENDPOINT": "https://otel:4318/"}) == "https://otel:4318/v1/traces"
    assert traces_url("", {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://otel:4318/custom",
                           "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}) == "http://otel:4318/custom"
    assert traces_url("http://mine:4318", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}) == \
        "http://mine:4318/v1/traces"                                      # the flag wins over the environment
    assert traces_url("http://mine:4318", {"OTEL_SDK_DISABLED": "true"}) == ""
    with pytest.raises(ValueError, match="--otlp-endpoint"):
        traces_url("collector:4318", {})
