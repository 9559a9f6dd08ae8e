"""Real servers with /metrics on: make calls over gRPC and HTTP, scrape over HTTP, check what moved, promtool.

Each stage here is started fresh with its own registry (``metrics_port=0``), so the numbers are only
this module's calls; a gateway in front of them serves its HTTP API, whose requests are counted by route
template; the dashboard's and the alerts' metric names are checked against what the four real endpoints
declare. ``serve()`` itself (the wiring in a real process) is checked with ``t2v serve`` subprocesses at
the end.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Iterator

import json

import grpc
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from services.common.metrics import build_info
from services.common.tensors import to_proto
from services.denoiser import engine as eng
from services.denoiser.metrics import DenoiserMetrics
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, text_encoder_pb2,
                    text_encoder_pb2_grpc)
from tests.conftest import (EMBEDDING_DIM, RunningStage, free_port, http_call, start_decoder, start_denoiser,
                            start_gateway, start_text_encoder, stop_gateway, stop_stage, wait_for as wait_until)
from tests.monitoring import PROMETHEUS_OWN, exposition_names, names_used, recorded
from tests.promtool import promtool_check

pytestmark = pytest.mark.slow

Samples = dict[tuple[str, frozenset], float]


def scrape(url: str) -> tuple[bytes, Samples]:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/plain")
        body = response.read()
    samples = {(s.name, frozenset(s.labels.items())): s.value
               for family in text_string_to_metric_families(body.decode()) for s in family.samples}
    return body, samples


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return get(after, name, **labels) - get(before, name, **labels)


@pytest.fixture(scope="module")
def text_encoder() -> Iterator[RunningStage]:
    stage = start_text_encoder(metrics_port=0)
    yield stage
    stop_stage(stage)


@pytest.fixture(scope="module")
def denoiser() -> Iterator[RunningStage]:
    stage = start_denoiser(metrics_port=0)
    yield stage
    stop_stage(stage)


@pytest.fixture(scope="module")
def decoder() -> Iterator[RunningStage]:
    stage = start_decoder(metrics_port=0)
    yield stage
    stop_stage(stage)


def test_common_metrics_on_every_stage(text_encoder, denoiser, decoder):
    for stage, name in ((text_encoder, "text_encoder"), (denoiser, "denoiser"), (decoder, "decoder")):
        body, samples = scrape(stage.metrics_url)
        assert get(samples, "t2v_model_loaded", stage=name) == 1
        assert get(samples, "t2v_model_load_duration_seconds_count", stage=name) == 1
        assert get(samples, "t2v_model_load_duration_seconds_sum", stage=name) > 0
        assert get(samples, "process_resident_memory_bytes") > 0
        assert get(samples, "t2v_build_info", **build_info()) == 1
        promtool_check(body, f"the {name} stage's /metrics")


def test_text_encoder_counts_prompts_truncation_and_calls(text_encoder):
    stub = text_encoder_pb2_grpc.TextEncoderStub(text_encoder.channel())
    _, before = scrape(text_encoder.metrics_url)
    stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["", "a cat", "a very long prompt " * 30]), timeout=30)
    stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["a dog"]), timeout=30)
    with pytest.raises(grpc.RpcError):
        stub.Encode(text_encoder_pb2.EncodeRequest(prompts=[]), timeout=30)
    body, after = scrape(text_encoder.metrics_url)
    assert delta(before, after, "t2v_text_encoder_prompts_total") == 4
    assert delta(before, after, "t2v_text_encoder_prompts_truncated_total") == 1
    assert delta(before, after, "t2v_text_encoder_encode_duration_seconds_count") == 2
    assert delta(before, after, "t2v_grpc_requests_total", method="Encode", code="OK") == 2
    assert delta(before, after, "t2v_grpc_requests_total", method="Encode", code="INVALID_ARGUMENT") == 1
    assert delta(before, after, "t2v_grpc_request_duration_seconds_count", method="Encode") == 3
    assert get(after, "t2v_grpc_requests_in_progress", method="Encode") == 0
    promtool_check(body, "the text encoder's /metrics after calls")


def denoise_request(steps: int, seed: int = 1) -> denoiser_pb2.DenoiseRequest:
    return denoiser_pb2.DenoiseRequest(request_id=f"m{seed}", embeddings=to_proto(torch.randn(2, 77, EMBEDDING_DIM)),
                                       num_frames=2, height=32, width=32, num_inference_steps=steps,
                                       guidance_scale=9.0, seed=seed, scheduler="ddim")


def test_denoiser_counts_exactly_the_steps_of_a_request_run_alone(denoiser):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser.channel())
    _, before = scrape(denoiser.metrics_url)
    events = list(stub.Denoise(denoise_request(steps=4), timeout=60))
    assert events[-1].HasField("latents")
    _, after = scrape(denoiser.metrics_url)
    assert delta(before, after, "t2v_denoiser_steps_total") == 4
    assert delta(before, after, "t2v_denoiser_unet_forwards_total") == 4
    assert delta(before, after, "t2v_denoiser_batch_size_count") == 4
    assert delta(before, after, "t2v_denoiser_batch_size_sum") == 4           # alone: batches of 1
    assert delta(before, after, "t2v_denoiser_batch_size_bucket", le="1.0") == 4
    assert delta(before, after, "t2v_denoiser_step_duration_seconds_count") == 4
    assert delta(before, after, "t2v_denoiser_step_duration_seconds_sum") > 0
    assert delta(before, after, "t2v_denoiser_requests_total", outcome="finished") == 1
    assert delta(before, after, "t2v_grpc_requests_total", method="Denoise", code="OK") == 1
    assert get(after, "t2v_denoiser_active_requests") == 0


def wait_for(url: str, name: str, at_least: float, timeout: float = 30, **labels: str) -> Samples:
    deadline = time.monotonic() + timeout
    while True:
        _, samples = scrape(url)
        if get(samples, name, **labels) >= at_least or time.monotonic() > deadline:
            return samples
        time.sleep(0.05)


def test_denoiser_batches_a_joining_request_and_counts_the_cancelled_one(denoiser):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser.channel())
    _, before = scrape(denoiser.metrics_url)
    long_call = stub.Denoise(denoise_request(steps=400, seed=2), timeout=120)
    assert next(long_call).HasField("progress")            # the long request is running
    _, during = scrape(denoiser.metrics_url)
    assert get(during, "t2v_denoiser_active_requests") == 1
    short = list(stub.Denoise(denoise_request(steps=5, seed=3), timeout=60))   # joins the long one's batch
    assert short[-1].HasField("latents")
    long_call.cancel()
    after = wait_for(denoiser.metrics_url, "t2v_denoiser_requests_total",
                     get(before, "t2v_denoiser_requests_total", outcome="cancelled") + 1, outcome="cancelled")
    forwards = delta(before, after, "t2v_denoiser_unet_forwards_total")
    request_steps = delta(before, after, "t2v_denoiser_steps_total")
    assert delta(before, after, "t2v_denoiser_requests_total", outcome="finished") == 1
    assert delta(before, after, "t2v_denoiser_requests_total", outcome="cancelled") == 1
    assert delta(before, after, "t2v_denoiser_batch_size_count") == forwards
    assert delta(before, after, "t2v_denoiser_batch_size_sum") == request_steps
    # The short request's 5 steps shared forwards with the long one: batches of 2 were observed.
    assert request_steps - forwards == 5
    assert delta(before, after, "t2v_denoiser_batch_size_count") - \
        delta(before, after, "t2v_denoiser_batch_size_bucket", le="1.0") == 5
    wait_for(denoiser.metrics_url, "t2v_grpc_requests_total", 1, method="Denoise", code="CANCELLED")
    _, final = scrape(denoiser.metrics_url)
    assert get(final, "t2v_denoiser_active_requests") == 0
    assert delta(before, final, "t2v_grpc_requests_total", method="Denoise", code="CANCELLED") == 1


def test_decoder_counts_frames_bytes_and_times(decoder):
    stub = decoder_pb2_grpc.DecoderStub(decoder.channel())
    _, before = scrape(decoder.metrics_url)
    response = stub.Decode(decoder_pb2.DecodeRequest(latents=to_proto(torch.randn(1, 4, 5, 8, 8)), fps=8), timeout=30)
    body, after = scrape(decoder.metrics_url)
    assert delta(before, after, "t2v_decoder_frames_decoded_total") == 5
    assert delta(before, after, "t2v_decoder_mp4_size_bytes_sum") == len(response.video)
    assert delta(before, after, "t2v_decoder_mp4_size_bytes_count") == 1
    assert delta(before, after, "t2v_decoder_vae_decode_duration_seconds_count") == 1
    assert delta(before, after, "t2v_decoder_mp4_encode_duration_seconds_count") == 1
    assert delta(before, after, "t2v_grpc_requests_total", method="Decode", code="OK") == 1
    promtool_check(body, "the decoder's /metrics after a call")


# --- the gateway: its HTTP API, its result store; the dashboard's names on the real endpoints ---------

@pytest.fixture(scope="module")
def gateway(text_encoder, denoiser, decoder, tmp_path_factory) -> Iterator[RunningStage]:
    stage = start_gateway(text_encoder.address, denoiser.address, decoder.address, http_port=0, metrics_port=0,
                          state_dir=str(tmp_path_factory.mktemp("gateway-state")))
    yield stage
    stop_gateway(stage)


def http(gateway: RunningStage, method: str, path: str, body: dict | None = None) -> tuple[int, bytes]:
    return http_call(gateway.http_url + path, method, body)


def test_a_client_that_hangs_up_mid_body_is_a_client_error_not_a_500(gateway, caplog) -> None:
    """A POST whose client resets the connection before its body has come was answered and counted as a 500,
    with a traceback in the log (starlette's ClientDisconnect): it is 499 now, a 4xx, and one info line."""
    import socket
    import struct
    from urllib.parse import urlparse

    _, before = scrape(gateway.metrics_url)
    url = urlparse(gateway.http_url)
    with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/videos HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100000\r\n\r\n{\"prompt\":")
        time.sleep(0.5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))     # a reset, not a FIN
    counted = lambda status: delta(before, scrape(gateway.metrics_url)[1], "t2v_gateway_http_requests_total",  # noqa: E731
                                   method="POST", route="/v1/videos", status=status)
    wait_until(lambda: counted("4xx") == 1, 10, "the hang-up to be counted")
    assert counted("5xx") == 0
    assert "http_failed" not in caplog.text and "Exception in ASGI application" not in caplog.text


def test_gateway_counts_http_requests_by_route_template(gateway):
    _, before = scrape(gateway.metrics_url)
    status, answer = http(gateway, "POST", "/v1/videos", {"prompt": "a red ball", "num_inference_steps": 2,
                                                          "num_frames": 2, "size": "32x32"})
    assert status == 200, answer
    video_id = json.loads(answer)["id"]
    finished = wait_until(lambda: (v := json.loads(http(gateway, "GET", f"/v1/videos/{video_id}")[1]))["status"]
                          in ("completed", "failed") and v, 60, "the video to finish")
    assert finished["status"] == "completed", finished
    polls = delta(before, scrape(gateway.metrics_url)[1], "t2v_gateway_http_requests_total", method="GET",
                  route="/v1/videos/{video_id}", status="2xx")
    assert http(gateway, "GET", f"/v1/videos/{video_id}/content")[0] == 200
    assert http(gateway, "GET", f"/v1/videos/{'f' * 32}")[0] == 404
    assert http(gateway, "GET", "/no/such/page")[0] == 404
    assert http(gateway, "GET", "/healthz")[0] == 200
    body, after = scrape(gateway.metrics_url)
    moved = {}
    for (name, labels), value in after.items():
        if name == "t2v_gateway_http_requests_total" and value != before.get((name, labels), 0):
            label = dict(labels)
            moved[(label["method"], label["route"], label["status"])] = value - before.get((name, labels), 0)
    assert moved == {("POST", "/v1/videos", "2xx"): 1, ("GET", "/v1/videos/{video_id}", "2xx"): polls,
                     ("GET", "/v1/videos/{video_id}", "4xx"): 1, ("GET", "/v1/videos/{video_id}/content", "2xx"): 1,
                     ("GET", "other", "4xx"): 1, ("GET", "/healthz", "2xx"): 1}, moved
    assert polls >= 1
    assert video_id.encode() not in body and b"/no/such/page" not in body      # never a raw path
    assert delta(before, after, "t2v_gateway_http_request_duration_seconds_count", method="POST",
                 route="/v1/videos") == 1
    promtool_check(body, "the gateway's /metrics after HTTP requests")


def test_gateway_exports_its_result_stores_space(gateway):
    body, samples = scrape(gateway.metrics_url)
    free = get(samples, "t2v_gateway_result_store_free_bytes")
    size = get(samples, "t2v_gateway_result_store_size_bytes")
    info = os.statvfs(gateway.servicer.config.state_dir)
    assert size == info.f_blocks * info.f_frsize
    assert 0 < free <= size and abs(free - info.f_bavail * info.f_frsize) < 256 << 20
    assert get(samples, "t2v_build_info", **build_info()) == 1
    assert get(samples, "t2v_model_loaded", stage="gateway") == 1


def test_the_dashboard_and_the_alerts_name_only_what_the_real_endpoints_declare(text_encoder, denoiser, decoder,
                                                                                 gateway):
    declared = set().union(*(exposition_names(scrape(s.metrics_url)[0].decode())
                             for s in (text_encoder, denoiser, decoder, gateway)))
    known = declared | PROMETHEUS_OWN | recorded()
    unknown = {where: names - known for where, names in names_used().items() if names - known}
    assert not unknown
    assert {"t2v_denoiser_step_duration_seconds_sum", "t2v_gateway_result_store_free_bytes"} <= declared


# --- the engine's observer, for the outcome the servers cannot easily provoke --------------------

class BrokenUnet(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        self.config = unet.config

    def forward(self, *args, **kwargs):
        raise RuntimeError("out of memory (simulated)")


def test_the_engine_reports_failed_requests(model_dir):
    metrics = DenoiserMetrics()
    engine = eng.DenoiseEngine.from_folder(model_dir, torch.device("cpu"), torch.float32, observer=metrics)
    engine.unet = BrokenUnet(engine.unet)
    engine.start()
    try:
        req = eng.Request(request_id="f", embeddings=torch.randn(2, 77, engine.embedding_dim), num_frames=2,
                          height=32, width=32, num_inference_steps=3, guidance_scale=9.0, seed=1)
        job = engine.submit(req)
        assert isinstance(job.events.get(timeout=60), eng.Failed)
    finally:
        engine.stop(1.0)
    registry = metrics.registry
    assert registry.get_sample_value("t2v_denoiser_requests_total", {"outcome": "failed"}) == 1
    assert registry.get_sample_value("t2v_denoiser_unet_forwards_total") == 0


# --- serve(): a real process with --metrics-port ------------------------------------------------

@pytest.mark.parametrize("service", ["text_encoder", "gateway"])
def test_t2v_serve_exposes_metrics_on_its_metrics_port(service, tmp_path):
    grpc_port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    args = [sys.executable, "-m", "t2v", "serve", service, "--port", str(grpc_port),
            "--metrics-port", str(metrics_port)]
    if service != "gateway":
        args += ["--device", "cpu"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[bytes] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 120
        samples: Samples = {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                body, samples = scrape(url)
            except OSError:
                body = b""
            if get(samples, "t2v_model_loaded", stage=service) == 1:
                break
            time.sleep(0.2)
        log = b"".join(output).decode(errors="replace")
        assert get(samples, "t2v_model_loaded", stage=service) == 1, f"never loaded; log:\n{log}"
        assert get(samples, "t2v_model_load_duration_seconds_count", stage=service) == 1
        promtool_check(body, f"t2v serve {service}")
        if service == "text_encoder":
            with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
                text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(
                    text_encoder_pb2.EncodeRequest(prompts=["a cat"]), timeout=30)
            _, samples = scrape(url)
            assert get(samples, "t2v_grpc_requests_total", method="Encode", code="OK") == 1
            assert get(samples, "t2v_text_encoder_prompts_total") == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
        reader.join(timeout=5)
    log = b"".join(output).decode(errors="replace")
    assert proc.returncode == 0, log
    assert f"event=metrics_listening url=http://127.0.0.1:{metrics_port}/metrics" in log
    with pytest.raises(OSError):
        scrape(url)                     # the port is closed with the service
