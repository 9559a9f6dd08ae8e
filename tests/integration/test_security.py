"""Intruders, over real sockets on loopback ports chosen at run time, with real certificates from a
CA made for the session (tests/pki.py): TLS on the gateway's gRPC and HTTP ports, mutual TLS between
the gateway and the stages, per-key rate limits, keys kept out of the logs, and request paths kept
away from the disk. docs/reliability.md ("Security") lists what each test proves.

The mTLS stages are second servers around the session's stage servicers (models loaded once); every
server started here is stopped at the end of its fixture or test.
"""

from __future__ import annotations

import os
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.config import REPO_ROOT, ServerConfig
from services.common.server import GrpcServer, message_options
from services.common.tls import ClientTls, load_client_tls
from services.gateway.orchestrator import Orchestrator, StageAddresses
from t2v import cli
from t2v.client import explain
from t2v.v1 import (decoder_pb2_grpc, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc, generation_pb2,
                    text_encoder_pb2, text_encoder_pb2_grpc)
from tests.conftest import RunningStage, free_port, wait_for
from tests.pki import Pki, make_pki

pytestmark = pytest.mark.slow

SMALL = dict(num_frames=2, height=32, width=32, num_inference_steps=1)
SERVING = health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@dataclass
class TlsStage:
    server: GrpcServer

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.port}"


@pytest.fixture(scope="module")
def mtls_stages(pki: Pki, text_encoder_stage: RunningStage, denoiser_stage: RunningStage,
                decoder_stage: RunningStage) -> Iterator[dict[str, TlsStage]]:
    """The three stages again, on ports that speak only mutual TLS (the mesh's CA), each with a
    plaintext health port for probes."""
    config = ServerConfig(port=0, tls_cert=pki.stage.cert, tls_key=pki.stage.key, tls_client_ca=pki.ca,
                          health_port=0)
    stages: dict[str, TlsStage] = {}
    for name, stage, add in [
            ("text_encoder", text_encoder_stage, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server),
            ("denoiser", denoiser_stage, denoiser_pb2_grpc.add_DenoiserServicer_to_server),
            ("decoder", decoder_stage, decoder_pb2_grpc.add_DecoderServicer_to_server)]:
        server = GrpcServer(config, stage.server.service_name, lambda s, add=add, stage=stage: add(stage.servicer, s))
        server.start()
        server.set_serving(True)
        stages[name] = TlsStage(server)
    yield stages
    for stage in stages.values():
        stage.server.stop(0)


def _health(address: str, tls: ClientTls | None) -> int | grpc.StatusCode:
    """The health status, or the error code of a refused call."""
    channel = (grpc.secure_channel(address, tls.grpc_credentials()) if tls else grpc.insecure_channel(address))
    with channel:
        try:
            return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        except grpc.RpcError as error:
            return error.code()


def test_a_stage_with_mtls_accepts_only_the_gateways_certificate(pki: Pki, mtls_stages: dict[str, TlsStage]) -> None:
    stage = mtls_stages["text_encoder"]
    gateway = load_client_tls(pki.ca, pki.gateway_client.cert, pki.gateway_client.key)
    refused = {"plaintext": None, "no client certificate": load_client_tls(pki.ca),
               "a certificate from another CA": load_client_tls(pki.ca, pki.rogue_client.cert, pki.rogue_client.key)}
    for what, tls in refused.items():
        assert _health(stage.address, tls) == grpc.StatusCode.UNAVAILABLE, what
    assert _health(stage.address, gateway) == SERVING
    assert _health(stage.address, load_client_tls(pki.rogue_ca, pki.gateway_client.cert,
                                                  pki.gateway_client.key)) == grpc.StatusCode.UNAVAILABLE
    with grpc.secure_channel(stage.address, gateway.grpc_credentials(),  # type: ignore[union-attr]
                             options=message_options(64 << 20)) as channel:
        answer = text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(
            text_encoder_pb2.EncodeRequest(prompts=["a red ball"]), timeout=30)
        assert answer.embeddings.shape[0] >= 1
    # Probes: a plaintext port that answers health checks, and nothing else.
    health = f"127.0.0.1:{stage.server.health_port}"
    assert _health(health, None) == SERVING
    with grpc.insecure_channel(health) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(text_encoder_pb2.EncodeRequest(prompts=["x"]),
                                                                  timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
    # The gateway's readiness check goes through the same mTLS channels: it needs its certificate.
    addresses = StageAddresses(*(mtls_stages[n].address for n in ("text_encoder", "denoiser", "decoder")))
    for tls, ready in ((gateway, True), (load_client_tls(pki.ca), False), (None, False)):
        orchestrator = Orchestrator(addresses, 64 << 20, 30.0, tls)
        try:
            assert orchestrator.ready(timeout=5) is ready
        finally:
            orchestrator.close()


def _https(url: str, ca: str | None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=ca) if ca else None
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=15, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def test_tls_gateway_end_to_end_with_mtls_to_the_stages(pki: Pki, mtls_stages: dict[str, TlsStage],
                                                      gateway_factory: Callable[..., RunningStage],
                                                      tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gateway = gateway_factory(tls_cert=pki.gateway.cert, tls_key=pki.gateway.key, http_port=0,
                              stage_tls_ca=pki.ca, stage_tls_cert=pki.gateway_client.cert,
                              stage_tls_key=pki.gateway_client.key,
                              **{name: stage.address for name, stage in mtls_stages.items()})
    address = gateway.address
    # t2v generate --ca: TLS to the gateway, then mTLS from the gateway to each stage, a real video.
    output = tmp_path / "tls.mp4"
    code = cli.main(["generate", "a red ball", "--gateway", address, "--ca", pki.ca, "--frames", "2",
                     "--height", "32", "--width", "32", "--steps", "1", "--seed", "7", "-o", str(output)])
    assert code == 0, capsys.readouterr().err
    assert output.read_bytes()[4:8] == b"ftyp"
    # A plaintext client, and one that trusts another CA, are refused before any call is made.
    for channel, hint in ((grpc.insecure_channel(address), "--ca"),
                          (grpc.secure_channel(address, load_client_tls(pki.rogue_ca).grpc_credentials()), "TLS")):
        with channel, pytest.raises(grpc.RpcError) as caught:
            gateway_pb2_grpc.GatewayStub(channel).ListJobs(gateway_pb2.ListJobsRequest(), timeout=5)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        assert hint in explain(address, caught.value)
    assert cli.main(["generate", "x", "--gateway", address, "--steps", "1", "--timeout", "5",
                     "-o", str(tmp_path / "no.mp4")]) == 1
    assert "--ca" in capsys.readouterr().err
    # The HTTP API and the page: HTTPS with the same certificate; /healthz sees the stages over mTLS.
    base = gateway.http_url
    assert base.startswith("https://")
    assert _https(base + "/healthz", pki.ca) == (200, b'{"status":"serving"}')
    status, body = _https(base + "/v1/videos", pki.ca)
    assert status == 200 and b'"object":"list"' in body
    with pytest.raises((urllib.error.URLError, ssl.SSLError)):
        _https(base + "/healthz", pki.rogue_ca)                        # the gateway's certificate is not trusted
    with pytest.raises((urllib.error.URLError, ConnectionError, OSError)):
        _https(base.replace("https://", "http://") + "/healthz", None)  # plaintext HTTP to the TLS port


# --- rate limits ------------------------------------------------------------------------------------------
def _metric(gateway: RunningStage, api: str) -> float:
    value = gateway.servicer.metrics.registry.get_sample_value("t2v_gateway_rate_limited_total", {"api": api})
    return float(value or 0)


def _list_jobs(stub: gateway_pb2_grpc.GatewayStub, key: str | None = None,
               header: str = "authorization") -> grpc.StatusCode:
    metadata = [(header, f"Bearer {key}" if header == "authorization" else key)] if key else None
    try:
        stub.ListJobs(gateway_pb2.ListJobsRequest(), metadata=metadata, timeout=10)
        return grpc.StatusCode.OK
    except grpc.RpcError as error:
        return error.code()


def test_per_key_rate_limit_over_grpc_and_http(gateway_factory: Callable[..., RunningStage],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("T2V_API_KEYS", "k-one,k-two")
    gateway = gateway_factory(rate_limit_per_minute=6, rate_limit_burst=2, http_port=0)   # then 1 per 10 s
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    for _ in range(4):                                   # refused keys cost their key nothing
        assert _list_jobs(stub, "k-wrong") == grpc.StatusCode.UNAUTHENTICATED
    assert [_list_jobs(stub, "k-one") for _ in range(2)] == [grpc.StatusCode.OK] * 2
    with pytest.raises(grpc.RpcError) as caught:
        stub.ListJobs.with_call(gateway_pb2.ListJobsRequest(), metadata=[("authorization", "Bearer k-one")],
                                timeout=10)
    error = caught.value
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after = dict(error.trailing_metadata())["retry-after"]
    assert retry_after in ("9", "10")
    assert "too many requests for this API key" in error.details()
    assert f"retry in about {retry_after} s" in error.details()
    params = generation_pb2.GenerationParams(prompt="x", **SMALL)
    with pytest.raises(grpc.RpcError) as caught:         # a streaming call is charged too
        list(stub.Generate(gateway_pb2.GenerateRequest(params=params), metadata=[("x-api-key", "k-one")], timeout=10))
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    # HTTP shares the key's bucket: k-one is out there too; k-two is not.
    status, body, headers = _http(gateway.http_url + "/v1/videos", "k-one")
    assert status == 429 and headers["Retry-After"] in ("9", "10")
    assert b'"type":"rate_limit_error"' in body and b'"code":"resource_exhausted"' in body
    assert _http(gateway.http_url + "/v1/videos", "k-two")[0] == 200
    assert _list_jobs(stub, "k-two") == grpc.StatusCode.OK
    for _ in range(5):                                   # probes are never limited
        assert _health(gateway.address, None) == SERVING
        assert _http(gateway.http_url + "/healthz", None)[0] == 200
    assert (_metric(gateway, "grpc"), _metric(gateway, "http")) == (2, 1)


def test_with_keys_off_the_limit_is_per_address_and_a_made_up_key_does_not_dodge_it(
        gateway_factory: Callable[..., RunningStage]) -> None:
    gateway = gateway_factory(rate_limit_per_minute=6, rate_limit_burst=1, http_port=0)
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    assert _list_jobs(stub, "made-up-1", header="x-api-key") == grpc.StatusCode.OK
    assert _list_jobs(stub, "made-up-2", header="x-api-key") == grpc.StatusCode.RESOURCE_EXHAUSTED
    status, body, headers = _http(gateway.http_url + "/v1/videos", "made-up-3")
    assert status == 429 and headers["Retry-After"] in ("9", "10") and b"this client address" in body


def _http(url: str, key: str | None) -> tuple[int, bytes, Any]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=15) as response:
            return response.status, response.read(), response.headers
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read(), error.headers


# --- keys never logged: a real gateway process, its whole log read back ---------------------------------
def test_api_keys_never_appear_in_a_gateways_log(text_encoder_stage: RunningStage, denoiser_stage: RunningStage,
                                                 decoder_stage: RunningStage, tmp_path: Path) -> None:
    right, wrong = "k-right-" + uuid.uuid4().hex, "k-wrong-" + uuid.uuid4().hex
    port, http_port = free_port(), free_port()
    env = {**os.environ, "T2V_API_KEYS": right, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "t2v", "serve", "gateway", "--port", str(port), "--http-port", str(http_port),
               "--log-level", "debug", "--state-dir", str(tmp_path / "state"), "--grace-seconds", "1",
               "--rate-limit-per-minute", "600", "--rate-limit-burst", "4",
               "--text-encoder", text_encoder_stage.address, "--denoiser", denoiser_stage.address,
               "--decoder", decoder_stage.address]
    log = tmp_path / "gateway.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT)
    try:
        address = f"127.0.0.1:{port}"
        wait_for(lambda: process.poll() is not None or _health(address, None) == SERVING, 60, "the gateway")
        assert process.poll() is None, log.read_text()
        stub = gateway_pb2_grpc.GatewayStub(grpc.insecure_channel(address, options=message_options(64 << 20)))
        params = generation_pb2.GenerationParams(prompt="a red ball", **SMALL)
        events = list(stub.Generate(gateway_pb2.GenerateRequest(params=params),
                                    metadata=[("authorization", f"Bearer {right}")], timeout=60))
        assert events[-1].result.video[4:8] == b"ftyp"
        assert _list_jobs(stub, wrong) == grpc.StatusCode.UNAUTHENTICATED
        assert _list_jobs(stub, wrong, header="x-api-key") == grpc.StatusCode.UNAUTHENTICATED
        base = f"http://127.0.0.1:{http_port}"
        assert _http(base + "/v1/videos", right)[0] == 200
        assert _http(base + "/v1/videos", wrong)[0] == 401
        assert _http(base + f"/v1/videos/{uuid.uuid4().hex}", right)[0] == 404
        statuses = [_list_jobs(stub, right) for _ in range(6)]            # over the burst: refusals
        assert grpc.StatusCode.RESOURCE_EXHAUSTED in statuses
    finally:
        process.terminate()
        process.wait(timeout=30)
    text = log.read_text()
    assert "event=unauthenticated" in text and "event=http_request" in text and "event=job_" in text, text[-2000:]
    assert right not in text and wrong not in text
    assert right[2:] not in text and wrong[2:] not in text          # not even without its prefix


# --- bad TLS settings: one sentence at start -------------------------------------------------------------
def test_bad_tls_settings_stop_the_gateway_with_one_sentence(pki: Pki, tmp_path: Path) -> None:
    for args, words in [(["--tls-key", pki.gateway.key], "--tls-cert"),
                        (["--tls-cert", pki.gateway.cert, "--tls-key", pki.stage.key], "does not go with"),
                        (["--stage-tls-ca", str(tmp_path / "nowhere.pem")], "cannot read")]:
        done = subprocess.run([sys.executable, "-m", "t2v", "serve", "gateway", "--port", "0",
                               "--state-dir", str(tmp_path / "state"), *args],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=60)
        assert done.returncode != 0
        assert "Traceback" not in done.stderr and words in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr


# --- the result store: only files it wrote, never a path from a request ---------------------------------
def test_request_paths_never_reach_the_disk(gateway_factory: Callable[..., RunningStage], tmp_path: Path) -> None:
    gateway = gateway_factory(http_port=0)
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET-CONTENT")
    stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
    base = gateway.http_url

    def grpc_code(job_id: str) -> grpc.StatusCode:
        try:
            list(stub.GetVideo(gateway_pb2.GetVideoRequest(job_id=job_id), timeout=10))
            return grpc.StatusCode.OK
        except grpc.RpcError as error:
            assert "TOP-SECRET" not in (error.details() or "")
            return error.code()

    for bad in (f"../../../..{secret}", str(secret), "0" * 32 + "\x00", "0" * 16 + "/../" + "0" * 12, ".."):
        assert grpc_code(bad) == grpc.StatusCode.INVALID_ARGUMENT, bad
    for path in (f"..%2F..%2F..%2F..{str(secret).replace('/', '%2F')}", str(secret).replace("/", "%2F"),
                 "0" * 32 + "%00", "%2e%2e", "0" * 32 + "%2F..%2F..%2F..%2Fsecret.txt"):
        for suffix in ("/content", ""):
            status, body, _ = _http(f"{base}/v1/videos/{path}{suffix}", None)
            assert status in (400, 404) and b"TOP-SECRET" not in body, (path, status, body)
    status, body, _ = _http(f"{base}/v1/videos/../../../..{secret}", None)    # urllib sends it as written
    assert status in (400, 404) and b"TOP-SECRET" not in body
    # Files in the results folder that the gateway did not write are not served.
    results = Path(gateway.servicer.config.state_dir) / "results"
    planted = uuid.uuid4().hex
    (results / f"{planted}.mp4").symlink_to(secret)
    assert grpc_code(planted) == grpc.StatusCode.NOT_FOUND
    assert _http(f"{base}/v1/videos/{planted}/content", None)[0] == 404
    job = stub.SubmitJob(gateway_pb2.SubmitJobRequest(params=generation_pb2.GenerationParams(prompt="x", **SMALL)),
                         timeout=10)
    wait_for(lambda: stub.GetJob(gateway_pb2.GetJobRequest(job_id=job.job_id), timeout=10).status
             == gateway_pb2.JOB_STATUS_COMPLETED, 60, "the job to complete")
    assert grpc_code(job.job_id) == grpc.StatusCode.OK
    video = results / f"{job.job_id}.mp4"
    video.unlink()
    video.symlink_to(secret)                            # a completed job's file swapped for a symlink
    assert grpc_code(job.job_id) == grpc.StatusCode.NOT_FOUND
    status, body, _ = _http(f"{base}/v1/videos/{job.job_id}/content", None)
    assert status == 404 and b"TOP-SECRET" not in body
