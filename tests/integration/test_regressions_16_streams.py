"""Regressions of issue 16: long streams starved health checks and short calls (defect 4), and slow or idle
clients were never timed out on the HTTP API and the /metrics ports.

Every server here runs on loopback; the gateways call stages that are not there (port 1), so their jobs
wait and their streams stay open without any model running. Each test failed on the code before its fix.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from typing import Iterator

import grpc
import pytest
from fastapi.responses import StreamingResponse
from grpc_health.v1 import health_pb2, health_pb2_grpc

import services.common.metrics as common_metrics
import services.gateway.http as gateway_http
from services.common.config import ServerConfig
from services.common.metrics import ServiceMetrics
from services.common.server import GrpcServer
from services.gateway.app import GatewayConfig, limits_from
from services.gateway.http import Backend, HttpServer, create_app
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2
from tests.conftest import RunningStage, start_gateway, stop_gateway, wait_for

NOWHERE = "127.0.0.1:1"          # no stage: jobs wait for one, so their streams stay open
PARAMS = generation_pb2.GenerationParams(prompt="a red ball moving right", num_frames=1, height=32, width=32,
                                         num_inference_steps=1)


@pytest.fixture
def waiting_gateway() -> Iterator[RunningStage]:
    """A gateway of 16 gRPC threads (so, by default, 12 streams) whose jobs all wait: no stage is up."""
    gateway = start_gateway(NOWHERE, NOWHERE, NOWHERE, max_workers=16, slots=1, max_queue=256, http_port=0)
    yield gateway
    stop_gateway(gateway)


def _job_count(gateway: RunningStage) -> int:
    return len(gateway.servicer.jobs.list(None, 1000, "")[0])


def _sample(gateway: RunningStage, name: str, **labels: str) -> float:
    return gateway.servicer.metrics.registry.get_sample_value(name, labels) or 0.0


# --- defect 4: more Generate streams than handler threads -------------------------------------------------
def test_streams_beyond_the_cap_are_refused_and_health_and_short_calls_still_answer(waiting_gateway) -> None:
    """32 Generate streams against 16 handler threads took every thread: grpc.health.v1 Check and ListJobs
    timed out (a liveness probe would restart a healthy gateway). Now 12 streams (three quarters of
    --max-workers) are served, the other 20 are refused at once with RESOURCE_EXHAUSTED and a sentence,
    without a job, and health and ListJobs answer in milliseconds."""
    gateway = waiting_gateway
    channel = gateway.channel()
    stub = gateway_pb2_grpc.GatewayStub(channel)
    calls = [stub.Generate(gateway_pb2.GenerateRequest(params=PARAMS), timeout=60) for _ in range(32)]
    try:
        wait_for(lambda: _job_count(gateway) >= 12, 15, "the first 12 streams to create their jobs")
        time.sleep(0.5)                   # the other calls reach the server (and, before the fix, its queue)

        started = time.monotonic()
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=100), timeout=2)
        assert time.monotonic() - started < 2

        wait_for(lambda: sum(call.done() for call in calls) >= 20, 5, "20 streams refused")
        refused = [call for call in calls if call.done()]
        assert len(refused) == 20
        for call in refused:
            assert call.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "--max-streams" in call.details() and "SubmitJob" in call.details(), call.details()
            assert dict(call.trailing_metadata())["retry-after"] == "5"
        assert _job_count(gateway) == 12                      # a refused stream created no job
        listed = stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=100), timeout=2)
        assert len(listed.jobs) == 12
        assert _sample(gateway, "t2v_grpc_streams_open") == 12
        assert _sample(gateway, "t2v_grpc_streams_refused_total", method="Generate") == 20

        # A stream that ends frees its place for the next one.
        open_calls = [call for call in calls if not call.done()]
        open_calls[0].cancel()
        wait_for(lambda: _sample(gateway, "t2v_grpc_streams_open") == 11, 5, "the cancelled stream to end")
        again = stub.Generate(gateway_pb2.GenerateRequest(params=PARAMS), timeout=60)
        calls.append(again)
        first = next(again)
        assert first.job_id and first.HasField("queue")
    finally:
        for call in calls:
            call.cancel()
        channel.close()


def test_sse_streams_do_not_starve_healthz(waiting_gateway) -> None:
    """The HTTP side was never starved (an event stream holds no thread: uvicorn's event loop polls it); this
    keeps it so: 100 open event streams, more than the 40 threads of the route pool, and /healthz still
    answers at once (503 here: the stages are down, and it says so)."""
    base = waiting_gateway.http_url
    port = waiting_gateway.servicer.http.port
    ids = []
    for n in range(100):
        request = urllib.request.Request(base + "/v1/videos", data=json.dumps(
            {"prompt": f"ball {n}", "size": "32x32"}).encode(), headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as answer:
            ids.append(json.load(answer)["id"])
    streams = []
    try:
        for video_id in ids:
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(f"GET /v1/videos/{video_id}/events HTTP/1.1\r\nHost: gateway\r\n\r\n".encode())
            streams.append(sock)
        assert all(sock.recv(65536).startswith(b"HTTP/1.1 200") for sock in streams)
        for _ in range(5):
            started = time.monotonic()
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(base + "/healthz", timeout=5)
            assert refused.value.code == 503 and b"stage" in refused.value.read()
            assert time.monotonic() - started < 1.0
    finally:
        for sock in streams:
            sock.close()


# --- the cap in every service's server (the denoiser's Denoise streams alike) ---------------------------
def test_every_grpc_server_caps_its_streams_and_keeps_health_open() -> None:
    """The cap is in the common server, so the stages have it too (a denoiser took up to --max-jobs 64
    Denoise streams on 32 threads). A blocking stream method on a server of 8 threads: 6 streams are served,
    the rest refused; health Watch streams are never refused nor counted (grpc serves them without a thread),
    and Check answers throughout."""
    release = threading.Event()

    def wait(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        yield b"started"
        release.wait(30)

    def add(server: grpc.Server) -> None:
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("t2v.test.Slow", {
            "Wait": grpc.unary_stream_rpc_method_handler(wait)})])

    server = GrpcServer(ServerConfig(port=0, max_workers=8), "t2v.test.Slow", add)
    port = server.start()
    server.set_serving(True)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    slow = channel.unary_stream("/t2v.test.Slow/Wait")
    health = health_pb2_grpc.HealthStub(channel)
    watches = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(16)]
    calls = [slow(b"", timeout=30) for _ in range(16)]
    try:
        assert all(next(watch).status == health_pb2.HealthCheckResponse.SERVING for watch in watches)
        wait_for(lambda: sum(call.done() for call in calls) >= 10, 10, "10 streams refused")
        served = [call for call in calls if not call.done()]
        assert len(served) == 6 and all(next(call) == b"started" for call in served)
        assert {call.code() for call in calls if call.done()} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
        assert health.Check(health_pb2.HealthCheckRequest(), timeout=2).status == \
            health_pb2.HealthCheckResponse.SERVING
        assert not any(watch.done() for watch in watches)
    finally:
        release.set()
        for call in calls + watches:
            call.cancel()
        channel.close()
        stopper = threading.Thread(target=server.stop, args=(0,), daemon=True)
        stopper.start()            # in a thread: on the old code, a starved server never finished stopping
        stopper.join(10)


@pytest.mark.parametrize("streams", [-1, 8, 9])
def test_a_stream_cap_that_leaves_no_thread_is_refused_naming_the_flag(streams: int) -> None:
    with pytest.raises(ValueError, match="--max-streams"):
        GrpcServer(ServerConfig(port=0, max_workers=8, max_streams=streams), "t2v.test.Nothing", lambda s: None)


# --- slow and idle clients on the HTTP API and /metrics ---------------------------------------------------
class _HealthyJobs:
    def healthy(self) -> bool:
        return True


def _http_app():
    config = GatewayConfig(port=0)
    app = create_app(Backend(jobs=_HealthyJobs, limits=limits_from(config), model=config.model,  # type: ignore
                             stages_ready=lambda: True))

    async def slow_stream():
        for _ in range(6):
            yield b"tick\n"
            await asyncio.sleep(0.5)
    app.add_api_route("/slow", lambda: StreamingResponse(slow_stream(), media_type="text/plain"))
    return app


def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> float | None:
    """Seconds until the server closes ``sock`` (None if it has not after ``seconds``), sending ``trickle``
    one byte every 0.2 s meanwhile."""
    started = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    while time.monotonic() - started < seconds:
        try:
            if sent < len(trickle):
                sock.send(trickle[sent:sent + 1])
                sent += 1
            if sock.recv(65536) == b"":
                return time.monotonic() - started
        except socket.timeout:
            continue
        except OSError:                  # reset: closed too
            return time.monotonic() - started
    return None


def _response(sock: socket.socket) -> bytes:
    """One whole HTTP response with a Content-Length (its head and body may come in separate reads)."""
    data = b""
    while b"\r\n\r\n" not in data:
        more = sock.recv(65536)
        assert more, f"the connection closed mid-response: {data!r}"
        data += more
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        more = sock.recv(65536)
        assert more, f"the connection closed mid-response: {data!r}"
        body += more
    return head + b"\r\n\r\n" + body


HEADERS = b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nX-Slow: " + b"a" * 200 + b"\r\n\r\n"


def test_idle_and_trickling_http_clients_are_closed(monkeypatch) -> None:
    """A client that connected and sent nothing, or sent its headers a byte at a time, held its connection
    forever (uvicorn times out only the idle time between requests). Now a request must arrive whole within
    REQUEST_READ_SECONDS (10; 1.5 here); a kept-alive connection and a long response are not cut."""
    monkeypatch.setattr(gateway_http, "REQUEST_READ_SECONDS", 1.5, raising=False)
    server = HttpServer(_http_app(), "127.0.0.1", 0)
    server.start()
    try:
        idle = socket.create_connection(("127.0.0.1", server.port))
        trickling = socket.create_connection(("127.0.0.1", server.port))
        results: dict[str, float | None] = {}
        threads = [threading.Thread(target=lambda: results.__setitem__("idle", _closed_within(idle, 6))),
                   threading.Thread(target=lambda: results.__setitem__(
                       "trickling", _closed_within(trickling, 6, HEADERS)))]
        for thread in threads:
            thread.start()

        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as kept:
            for _ in range(2):           # the second request comes 2 s after the first: longer than the deadline
                kept.sendall(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n")
                assert _response(kept).startswith(b"HTTP/1.1 200")
                time.sleep(2)
            kept.sendall(b"GET /slow HTTP/1.1\r\nHost: gateway\r\n\r\n")
            body = b""
            while body.count(b"tick") < 6:          # 3 s of response: the deadline is off once the request is in
                more = kept.recv(65536)
                assert more, f"the long response was cut: {body!r}"
                body += more

        for thread in threads:
            thread.join()
        for name in ("idle", "trickling"):
            assert results[name] is not None, f"the {name} connection was still open after 6 s"
            assert 1.0 < results[name] < 4.0, results
        idle.close()
        trickling.close()
    finally:
        server.stop()


def test_idle_and_trickling_metrics_clients_are_closed_and_metrics_still_answer(monkeypatch) -> None:
    """Each connection to /metrics held a thread for as long as the client liked (prometheus_client's server
    has no timeout). Now a connection has METRICS_CONNECTION_SECONDS (10; 1.5 here) to send its request and
    take the answer; 150 idle sockets do not keep /metrics from answering, and their threads end."""
    monkeypatch.setattr(common_metrics, "METRICS_CONNECTION_SECONDS", 1.5, raising=False)
    metrics = ServiceMetrics("test")
    port = metrics.serve_http("127.0.0.1", 0)
    try:
        baseline = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(150)]
        trickling = socket.create_connection(("127.0.0.1", port))
        results: dict[str, float | None] = {}
        thread = threading.Thread(target=lambda: results.__setitem__(
            "trickling", _closed_within(trickling, 6, HEADERS.replace(b"/healthz", b"/metrics"))))
        thread.start()
        started = time.monotonic()
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
            assert answer.status == 200 and b"t2v_model_loaded" in answer.read()
        assert time.monotonic() - started < 2
        closed = _closed_within(idle[0], 6)
        thread.join()
        assert closed is not None, "an idle metrics connection was still open after 6 s"
        assert results["trickling"] is not None, "a trickling metrics connection was still open after 6 s"
        assert results["trickling"] < 4.0, results
        wait_for(lambda: threading.active_count() <= baseline + 5, 5, "the idle connections' threads to end")
        for sock in idle + [trickling]:
            sock.close()
    finally:
        metrics.stop_http()
