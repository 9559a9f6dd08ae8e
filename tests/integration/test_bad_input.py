"""Hand-picked bad input, over real sockets: oversized messages, wrong dtypes and shapes between
stages (a lying peer too), NaN / Inf tensors, 100 KB prompts, Unicode and control characters,
path-like ids on gRPC and HTTP, and one regression test per bug the fuzz tests found.

The fuzz tests (test_fuzz_*.py) explore; these pin the cases worth naming, so a reader sees what
each one does and a regression names itself when it fails.
"""

from __future__ import annotations

import http.client
import json
import math
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import grpc
import pytest
import requests
import torch

from services.common.config import ServerConfig
from services.common.contract import SCHEDULERS, TEXT_TOKENS
from services.common.server import GrpcServer, message_options
from services.common.tensors import from_proto, to_proto
from services.gateway.jobs import MAX_TIMEOUT_SECONDS
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, gateway_pb2, gateway_pb2_grpc,
                    generation_pb2, tensor_pb2, text_encoder_pb2, text_encoder_pb2_grpc)
from tests.conftest import RunningStage, wait_for
from tests.fuzzing import CALL_TIMEOUT, PATH_LIKE_IDS, assert_sentence, check_refusal, outcome

pytestmark = pytest.mark.slow

INVALID = {grpc.StatusCode.INVALID_ARGUMENT}
TINY = dict(num_frames=1, height=8, width=8, num_inference_steps=1)
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def tiny_params(**fields: Any) -> generation_pb2.GenerationParams:
    return generation_pb2.GenerationParams(**{"prompt": "a red ball", **TINY, **fields})


def embeddings_for(stage: RunningStage, rows: int = 2) -> torch.Tensor:
    return torch.randn(rows, TEXT_TOKENS, stage.servicer.engine.embedding_dim)


def denoise(stage: RunningStage, embeddings: tensor_pb2.Tensor, **fields: Any) -> Any:
    request = denoiser_pb2.DenoiseRequest(**{"embeddings": embeddings, **TINY, "guidance_scale": 9.0,
                                             "scheduler": SCHEDULERS[0], **fields})
    return outcome(lambda: denoiser_pb2_grpc.DenoiserStub(stage.channel()).Denoise(request, timeout=CALL_TIMEOUT))


def decode(stage: RunningStage, latents: tensor_pb2.Tensor, **fields: Any) -> Any:
    request = decoder_pb2.DecodeRequest(latents=latents, **{"fps": 8, **fields})
    return outcome(lambda: decoder_pb2_grpc.DecoderStub(stage.channel()).Decode(request, timeout=CALL_TIMEOUT))


def latents_for(stage: RunningStage, frames: int = 1, height: int = 1, width: int = 1) -> torch.Tensor:
    return torch.randn(1, stage.servicer.vae.latent_channels, frames, height, width)


def videos_on_disk(gateway: RunningStage) -> list[Path]:
    return sorted((Path(gateway.servicer.config.state_dir) / "results").glob("*"))


@pytest.fixture
def http_gateway(gateway_factory: Callable[..., RunningStage]) -> RunningStage:
    return gateway_factory(http_port=0)


def http_error(response: requests.Response, status: int, param: str | None = "") -> dict[str, Any]:
    """The JSON error of ``response``: the status, a sentence, and (unless "") the field named."""
    assert response.status_code == status, (response.status_code, response.text[:300])
    error = response.json()["error"]
    assert_sentence(error["message"], f"the {status} answer")
    if param != "":
        assert error["param"] == param, error
    return error


# --- oversized messages -------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["text_encoder_stage", "denoiser_stage", "decoder_stage", "gateway_stage"])
def test_a_message_over_the_limit_is_refused_and_the_server_keeps_serving(request, fixture) -> None:
    stage = request.getfixturevalue(fixture)
    limit = stage.server.config.max_message_bytes
    channel = grpc.insecure_channel(stage.address, options=message_options(2 * limit))
    huge = "x" * (limit + 1024)
    calls = {
        "text_encoder_stage": lambda: text_encoder_pb2_grpc.TextEncoderStub(channel).Encode(
            text_encoder_pb2.EncodeRequest(prompts=[huge]), timeout=CALL_TIMEOUT),
        "denoiser_stage": lambda: denoiser_pb2_grpc.DenoiserStub(channel).Denoise(
            denoiser_pb2.DenoiseRequest(request_id=huge), timeout=CALL_TIMEOUT),
        "decoder_stage": lambda: decoder_pb2_grpc.DecoderStub(channel).Decode(
            decoder_pb2.DecodeRequest(latents=tensor_pb2.Tensor(data=huge.encode())), timeout=CALL_TIMEOUT),
        "gateway_stage": lambda: gateway_pb2_grpc.GatewayStub(channel).SubmitJob(
            gateway_pb2.SubmitJobRequest(params=generation_pb2.GenerationParams(prompt=huge)), timeout=CALL_TIMEOUT),
    }
    check_refusal(outcome(calls[fixture]), {grpc.StatusCode.RESOURCE_EXHAUSTED}, f"{fixture}: {limit + 1024} bytes")
    channel.close()
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    health = health_pb2_grpc.HealthStub(stage.channel()).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_an_http_body_over_one_mib_is_a_400_with_or_without_content_length(http_gateway) -> None:
    url = http_gateway.http_url + "/v1/videos"
    body = json.dumps({"prompt": "x" * (2 << 20)}).encode()
    http_error(requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30), 400)
    chunked = requests.post(url, data=iter([body[i:i + 65536] for i in range(0, len(body), 65536)]),
                            headers={"Content-Type": "application/json"}, timeout=30)
    assert "over 1 MiB" in http_error(chunked, 400)["message"]


# --- dtypes, shapes and NaN / Inf between the stages -----------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_the_stages_take_each_wire_dtype(denoiser_stage, decoder_stage, dtype) -> None:
    denoised = denoise(denoiser_stage, to_proto(embeddings_for(denoiser_stage).to(dtype)))
    assert denoised.ok, denoised.details
    assert torch.isfinite(from_proto(denoised.answer[-1].latents)).all()
    decoded = decode(decoder_stage, to_proto(latents_for(decoder_stage, 2, 2, 3).to(dtype)), return_frames=True)
    assert decoded.ok and decoded.answer.num_frames == 2, decoded.details
    assert torch.isfinite(from_proto(decoded.answer.frames)).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_nan_and_inf_embeddings_and_latents_are_refused(denoiser_stage, decoder_stage, dtype, value) -> None:
    embeddings = embeddings_for(denoiser_stage)
    embeddings[1, 5, 3] = value
    check_refusal(denoise(denoiser_stage, to_proto(embeddings.to(dtype))), INVALID, "NaN/Inf embeddings")
    latents = latents_for(decoder_stage, 1, 2, 2)
    latents[0, 0, 0, 1, 1] = value
    result = decode(decoder_stage, to_proto(latents.to(dtype)))
    check_refusal(result, INVALID, "NaN/Inf latents")
    assert "NaN or Inf" in result.details


@pytest.mark.parametrize("tensor,words", [
    (tensor_pb2.Tensor(data=b"\0" * 8, shape=[1, 4], dtype=tensor_pb2.DTYPE_FLOAT32), "bytes"),
    (tensor_pb2.Tensor(data=b"\0" * 8, shape=[2], dtype=7), "dtype 7"),
    (tensor_pb2.Tensor(data=b"", shape=[], dtype=tensor_pb2.DTYPE_FLOAT16), "every dimension must be positive"),
    (tensor_pb2.Tensor(data=b"\0" * 8, shape=[2**62, 2**62, 4], dtype=tensor_pb2.DTYPE_FLOAT32), "bytes"),
    (tensor_pb2.Tensor(data=b"\0" * 8, shape=[-1, -2], dtype=tensor_pb2.DTYPE_FLOAT32), "positive"),
], ids=["short", "unknown-dtype", "no-shape", "absurd-shape", "negative-shape"])
def test_malformed_tensors_are_refused_by_both_tensor_stages(denoiser_stage, decoder_stage, tensor, words) -> None:
    for result in (denoise(denoiser_stage, tensor), decode(decoder_stage, tensor)):
        check_refusal(result, INVALID, "a malformed tensor")
        assert words in result.details


@contextmanager
def lying_stage(servicer: Any, add: Callable[[Any, grpc.Server], None], name: str) -> Iterator[str]:
    """A real gRPC server whose stage answers with malformed tensors: what a buggy or hostile peer
    would send. Yields its address; stopped on exit."""
    server = GrpcServer(ServerConfig(port=0), name, lambda s: add(servicer, s))
    port = server.start()
    server.set_serving(True)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def job_fails_past_lying_stage(gateway_factory, stage: str, servicer: Any, add: Callable[[Any, grpc.Server], None],
                               name: str, refused_by: str, what: str) -> gateway_pb2_grpc.GatewayStub:
    """One Generate through a gateway whose ``stage`` is ``servicer``: the next stage (``refused_by``)
    must refuse the malformed tensor INVALID_ARGUMENT, and no video may be written. Returns the stub
    while the gateway still runs, for more checks."""
    with lying_stage(servicer, add, name) as address:
        gateway = gateway_factory(**{stage: address})
        stub = gateway_pb2_grpc.GatewayStub(gateway.channel())
        result = outcome(lambda: stub.Generate(gateway_pb2.GenerateRequest(params=tiny_params()),
                                               timeout=CALL_TIMEOUT))
        check_refusal(result, INVALID, what)
        assert f"{refused_by} stage refused" in result.details
        assert videos_on_disk(gateway) == [], f"a video was written from {what}"
        return stub


class LyingTextEncoder(text_encoder_pb2_grpc.TextEncoderServicer):
    def __init__(self, embeddings: tensor_pb2.Tensor) -> None:
        self.embeddings = embeddings

    def Encode(self, request: Any, context: Any) -> text_encoder_pb2.EncodeResponse:
        infos = [text_encoder_pb2.PromptInfo(num_tokens=3)] * len(request.prompts)
        return text_encoder_pb2.EncodeResponse(embeddings=self.embeddings, prompts=infos)


class LyingDenoiser(denoiser_pb2_grpc.DenoiserServicer):
    def __init__(self, latents: tensor_pb2.Tensor) -> None:
        self.latents = latents

    def Denoise(self, request: Any, context: Any) -> Iterator[denoiser_pb2.DenoiseEvent]:
        yield denoiser_pb2.DenoiseEvent(progress=generation_pb2.StepProgress(step=1, total_steps=1))
        yield denoiser_pb2.DenoiseEvent(latents=self.latents)


def _embeddings_variants(dim: int) -> dict[str, tensor_pb2.Tensor]:
    good = torch.randn(2, TEXT_TOKENS, dim)
    nan = good.clone()
    nan[0, 0, 0] = math.nan
    shape, data = [2, TEXT_TOKENS, dim], to_proto(good).data
    return {"nan": to_proto(nan), "fewer-tokens": to_proto(good[:, :5]),
            "wider": to_proto(torch.randn(2, TEXT_TOKENS, dim + 1)), "one-row": to_proto(good[:1]),
            "unknown-dtype": tensor_pb2.Tensor(data=data, shape=shape, dtype=9),
            "short-bytes": tensor_pb2.Tensor(data=data[:-4], shape=shape, dtype=tensor_pb2.DTYPE_FLOAT32)}


@pytest.mark.parametrize("variant", ["nan", "fewer-tokens", "wider", "one-row", "unknown-dtype", "short-bytes"])
def test_a_text_encoder_that_sends_bad_embeddings_fails_the_job_with_a_sentence(
        gateway_factory, denoiser_stage, variant) -> None:
    embeddings = _embeddings_variants(denoiser_stage.servicer.engine.embedding_dim)[variant]
    stub = job_fails_past_lying_stage(gateway_factory, "text_encoder", LyingTextEncoder(embeddings),
                                      text_encoder_pb2_grpc.add_TextEncoderServicer_to_server, "t2v.v1.TextEncoder",
                                      "denoiser", f"embeddings {variant}")
    job = stub.ListJobs(gateway_pb2.ListJobsRequest(page_size=1), timeout=CALL_TIMEOUT).jobs[0]
    assert job.status == gateway_pb2.JOB_STATUS_FAILED and job.error.code == "INVALID_ARGUMENT"


def _latents_variants(channels: int) -> dict[str, tensor_pb2.Tensor]:
    good = torch.randn(1, channels, 1, 1, 1)
    return {"nan": to_proto(good * math.nan), "inf-half": to_proto((good * math.inf).half()),
            "fewer-channels": to_proto(good[:, :-1]), "rank-4": to_proto(good[0]),
            "too-wide": to_proto(torch.randn(1, channels, 1, 1, 4096))}


@pytest.mark.parametrize("variant", ["nan", "inf-half", "fewer-channels", "rank-4", "too-wide"])
def test_a_denoiser_that_sends_bad_latents_fails_the_job_and_writes_no_video(
        gateway_factory, decoder_stage, variant) -> None:
    latents = _latents_variants(decoder_stage.servicer.vae.latent_channels)[variant]
    job_fails_past_lying_stage(gateway_factory, "denoiser", LyingDenoiser(latents),
                               denoiser_pb2_grpc.add_DenoiserServicer_to_server, "t2v.v1.Denoiser", "decoder",
                               f"latents {variant}")


# --- prompts: 100 KB, Unicode, control characters -----------------------------------------------------------
HUNDRED_KB = ["x" * 100_000, "\U0001F600" * 25_000, "e\u0301" * 50_000]


@pytest.mark.parametrize("prompt", HUNDRED_KB, ids=["ascii", "emoji", "combining"])
def test_a_100_kb_prompt_is_refused_by_every_door(text_encoder_stage, http_gateway, prompt) -> None:
    check_refusal(outcome(lambda: text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel()).Encode(
        text_encoder_pb2.EncodeRequest(prompts=[prompt]), timeout=CALL_TIMEOUT)), INVALID, "Encode 100 KB")
    stub = gateway_pb2_grpc.GatewayStub(http_gateway.channel())
    for field in ("prompt", "negative_prompt"):
        params = tiny_params(**{field: prompt})
        for call in (lambda: stub.SubmitJob(gateway_pb2.SubmitJobRequest(params=params), timeout=CALL_TIMEOUT),
                     lambda: stub.Generate(gateway_pb2.GenerateRequest(params=params), timeout=CALL_TIMEOUT)):
            result = outcome(call)
            check_refusal(result, INVALID, f"{field} of 100 KB")
            assert f"{field} has {len(prompt)} characters" in result.details
        answer = requests.post(http_gateway.http_url + "/v1/videos", timeout=30,
                               json={"prompt": "ok", **{field: prompt}, "num_frames": 1, "size": "8x8"})
        http_error(answer, 400, field)
    assert stub.ListJobs(gateway_pb2.ListJobsRequest(), timeout=CALL_TIMEOUT).jobs == []


UNICODE_PROMPTS = ["\u202eevil\u202c right-to-left", "\U0001F468\u200d\U0001F469\u200d\U0001F467 family",
                   "Z\u0351\u0352\u0353a\u0354\u0355l\u0356g\u0357o", "tab\there\r\nnewline \x01\x1f\x7f",
                   "\ufeffbom and \u00a0nbsp", "\U0010FFFF last plane", "中文 日本語 한국어", "' OR 1=1; --"]


@pytest.mark.parametrize("prompt", UNICODE_PROMPTS)
def test_unicode_and_control_characters_make_a_video_and_come_back_intact(http_gateway, prompt) -> None:
    stub = gateway_pb2_grpc.GatewayStub(http_gateway.channel())
    events = list(stub.Generate(gateway_pb2.GenerateRequest(params=tiny_params(prompt=prompt, negative_prompt=prompt)),
                                timeout=CALL_TIMEOUT))
    assert events[-1].result.video[4:8] == b"ftyp"
    job = stub.GetJob(gateway_pb2.GetJobRequest(job_id=events[-1].job_id), timeout=CALL_TIMEOUT)
    assert (job.params.prompt, job.params.negative_prompt) == (prompt, prompt)
    answer = requests.get(f"{http_gateway.http_url}/v1/videos/{job.job_id}", timeout=30)
    assert answer.status_code == 200 and answer.json()["prompt"] == prompt


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_a_nul_character_is_refused_by_every_door(http_gateway, field) -> None:
    stub = gateway_pb2_grpc.GatewayStub(http_gateway.channel())
    result = outcome(lambda: stub.SubmitJob(gateway_pb2.SubmitJobRequest(
        params=tiny_params(**{field: "a red\x00ball"})), timeout=CALL_TIMEOUT))
    check_refusal(result, INVALID, "a NUL")
    assert "NUL" in result.details
    body = {"prompt": "ok", field: "a red\x00ball", "num_frames": 1, "size": "8x8"}
    assert "NUL" in http_error(requests.post(http_gateway.http_url + "/v1/videos", json=body, timeout=30),
                               400, field)["message"]


@pytest.mark.parametrize("body,content_type,words", [
    (b'{"prompt": "\\ud800 a lone surrogate"}', "application/json", "surrogate"),
    (b'{"prompt": "ok", "\\udfff": 1}', "application/json", "surrogate"),
    (b'{"prompt": "\xff\xfe not utf-8"}', "application/json", "not valid JSON"),
    (b"[" * 100_000, "application/json", "nested too deeply"),
    (b"prompt=%FF%FE&num_frames=1&size=8x8&num_inference_steps=1", "application/x-www-form-urlencoded", ""),
], ids=["surrogate-value", "surrogate-key", "invalid-utf8", "deep-nesting", "form-invalid-utf8"])
def test_text_that_is_not_text_is_a_400_not_a_500(http_gateway, body, content_type, words) -> None:
    """Regression (surrogate, deep nesting): both were a 500 before http._read_body checked them."""
    answer = requests.post(http_gateway.http_url + "/v1/videos", data=body, timeout=30,
                           headers={"Content-Type": content_type})
    if answer.status_code == 200:          # a form decodes bad bytes as U+FFFD: a valid, if odd, prompt
        assert content_type.endswith("urlencoded") and "\ufffd" in answer.json()["prompt"]
        return
    assert words in http_error(answer, 400)["message"]


# --- path-like ids ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("job_id", PATH_LIKE_IDS)
def test_path_like_ids_are_refused_over_grpc_and_touch_no_file(http_gateway, job_id) -> None:
    stub = gateway_pb2_grpc.GatewayStub(http_gateway.channel())
    for name, call in [("GetJob", lambda: stub.GetJob(gateway_pb2.GetJobRequest(job_id=job_id), timeout=CALL_TIMEOUT)),
                       ("CancelJob", lambda: stub.CancelJob(gateway_pb2.CancelJobRequest(job_id=job_id),
                                                            timeout=CALL_TIMEOUT)),
                       ("GetVideo", lambda: stub.GetVideo(gateway_pb2.GetVideoRequest(job_id=job_id),
                                                          timeout=CALL_TIMEOUT))]:
        result = outcome(call)
        check_refusal(result, INVALID, f"{name}({job_id!r})")
        assert "malformed" in result.details
    state = Path(http_gateway.servicer.config.state_dir)
    assert sorted(p.name for p in state.iterdir()) == ["jobs.sqlite3", "jobs.sqlite3-shm", "jobs.sqlite3-wal",
                                                       "jobs.sqlite3.lock", "results"]
    assert videos_on_disk(http_gateway) == []


RAW_PATHS = ["../../etc/passwd", "..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "%00", "0" * 31 + "%00", "..", ".",
             "%2e%2e", "..%5C..%5Cwindows", "results%2F..%2Fjobs.sqlite3", "%20" * 3, "A" * 32, "f" * 33,
             "%E2%80%AE" + "0" * 31, "0" * 32 + "%2F..", "~root"]


@pytest.mark.parametrize("raw", RAW_PATHS)
def test_path_like_ids_are_refused_over_http_with_a_sentence(http_gateway, raw) -> None:
    """Sent byte for byte (http.client does not normalise dot segments): a 400 or 404 with a JSON
    sentence on every route, never a file and never a 5xx."""
    port = int(http_gateway.http_url.rsplit(":", 1)[1])
    for method, path in [("GET", f"/v1/videos/{raw}"), ("DELETE", f"/v1/videos/{raw}"),
                         ("GET", f"/v1/videos/{raw}/content"), ("GET", f"/v1/videos/{raw}/events"),
                         ("GET", f"/v1/videos?after={raw}")]:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            connection.request(method, path)
            response = connection.getresponse()
            status, body = response.status, response.read()
        finally:
            connection.close()
        assert status in (400, 404), (method, path, status, body[:300])
        assert_sentence(json.loads(body)["error"]["message"], f"{method} {path}")
    assert videos_on_disk(http_gateway) == []


# --- regressions: one per bug the fuzz tests found ------------------------------------------------------------
def test_regression_two_requests_with_one_request_id_no_longer_kill_the_engine(denoiser_stage) -> None:
    """Jobs compared field by field: when a job finished behind another with the same request id, the
    engine's list.remove compared their embeddings with ==, which raised in the engine thread and
    killed it (that request and every later one hung). Now jobs compare by identity."""
    engine = denoiser_stage.servicer.engine
    request = denoiser_pb2.DenoiseRequest(embeddings=to_proto(embeddings_for(denoiser_stage)), request_id="same",
                                          **{**TINY, "num_inference_steps": denoiser_stage.servicer.config.max_steps},
                                          guidance_scale=9.0, scheduler=SCHEDULERS[0])
    first = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel()).Denoise(request, timeout=120)
    try:
        assert next(first).progress.step == 1                 # it runs, ahead of the next one in the engine
        second = denoise(denoiser_stage, to_proto(embeddings_for(denoiser_stage)), request_id="same")
        assert second.ok, (second.code, second.details)
    finally:
        first.cancel()
    wait_for(lambda: engine.active_jobs() == 0, 30, "the engine to drop the cancelled request")
    assert denoise(denoiser_stage, to_proto(embeddings_for(denoiser_stage)), request_id="same").ok


def test_regression_embeddings_with_other_than_77_tokens_are_refused(denoiser_stage) -> None:
    """A [2, 5, D] request was accepted, then failed the UNet forward of every request batched with it."""
    result = denoise(denoiser_stage, to_proto(torch.randn(2, 5, denoiser_stage.servicer.engine.embedding_dim)))
    check_refusal(result, INVALID, "5 tokens")
    assert f"[2, {TEXT_TOKENS}, " in result.details


def test_regression_latents_that_overflow_are_refused_by_the_denoiser(denoiser_stage, gateway_stage) -> None:
    """Finite but huge embeddings, or a huge guidance_scale, made NaN latents that the denoiser sent on."""
    result = denoise(denoiser_stage, to_proto(torch.full((2, TEXT_TOKENS, denoiser_stage.servicer.engine.embedding_dim),
                                                         3e38)))
    check_refusal(result, INVALID, "huge embeddings")
    assert "NaN or Inf while denoising" in result.details
    stub = gateway_pb2_grpc.GatewayStub(gateway_stage.channel())
    result = outcome(lambda: stub.Generate(gateway_pb2.GenerateRequest(params=tiny_params(
        guidance_scale=3e38, num_inference_steps=3)), timeout=CALL_TIMEOUT))
    check_refusal(result, INVALID, "guidance_scale 3e38")
    assert "denoiser stage refused" in result.details and "lower guidance_scale" in result.details


def test_regression_latents_too_large_for_the_vae_are_refused_not_decoded_to_nan(decoder_stage) -> None:
    """Found by test_fuzz_stages: finite latents of 1e30 decoded to NaN pixels, which to_uint8 turned
    into a video that looked made: a NaN video, silently."""
    result = decode(decoder_stage, to_proto(latents_for(decoder_stage, 1, 2, 2) * 1e30), return_frames=True)
    check_refusal(result, INVALID, "latents x 1e30")
    assert "NaN or Inf pixels" in result.details


def test_regression_a_huge_guidance_scale_never_makes_a_video(gateway_stage) -> None:
    """One step of guidance 3e38 gives finite latents near 1e34: the job must fail, not make a NaN video."""
    stub = gateway_pb2_grpc.GatewayStub(gateway_stage.channel())
    for steps in (1, 3):
        result = outcome(lambda: stub.Generate(gateway_pb2.GenerateRequest(params=tiny_params(
            guidance_scale=3e38, num_inference_steps=steps)), timeout=CALL_TIMEOUT))
        check_refusal(result, INVALID, f"guidance_scale 3e38, {steps} steps")
        assert "guidance_scale" in result.details


def test_regression_the_decoder_refuses_frames_wider_than_its_limit(decoder_stage) -> None:
    """A [1, C, 1, 1, 4096] tensor (64 KB) asked the VAE for a 32768-pixel-wide frame."""
    most = decoder_stage.servicer.config.max_size // decoder_stage.servicer.vae.scale_factor
    for shape in [(1, 1, most + 1), (1, most + 1, 1), (1, 1, 1 << 20)]:
        result = decode(decoder_stage, to_proto(latents_for(decoder_stage, *shape)))
        check_refusal(result, INVALID, f"latents {shape}")
        assert "pixels a side" in result.details
    assert decode(decoder_stage, to_proto(latents_for(decoder_stage, 1, 1, most))).ok


@pytest.mark.parametrize("timeout", [1e20, 1e300, MAX_TIMEOUT_SECONDS + 1.0])
def test_regression_an_absurd_timeout_is_refused_not_internal(http_gateway, timeout) -> None:
    """1e20 s overflowed the deadline in milliseconds (SQLite INTEGER): INTERNAL over gRPC, 500 over HTTP."""
    stub = gateway_pb2_grpc.GatewayStub(http_gateway.channel())
    result = outcome(lambda: stub.SubmitJob(gateway_pb2.SubmitJobRequest(params=tiny_params(), timeout_seconds=timeout),
                                            timeout=CALL_TIMEOUT))
    check_refusal(result, INVALID, f"timeout {timeout}")
    assert "timeout_seconds" in result.details
    answer = requests.post(http_gateway.http_url + "/v1/videos", timeout=30,
                           json={"prompt": "x", "num_frames": 1, "size": "8x8", "timeout_seconds": timeout})
    http_error(answer, 400, "timeout_seconds")
    assert stub.ListJobs(gateway_pb2.ListJobsRequest(), timeout=CALL_TIMEOUT).jobs == []
    ok = stub.SubmitJob(gateway_pb2.SubmitJobRequest(params=tiny_params(), timeout_seconds=MAX_TIMEOUT_SECONDS),
                        timeout=CALL_TIMEOUT)
    assert ok.job_id


@pytest.mark.parametrize("token", ["²", "\u0663", "１"])
def test_regression_a_page_token_of_non_ascii_digits_is_refused(gateway_stage, token) -> None:
    """'²'.isdigit() is True but int('²') raises: that was INTERNAL."""
    stub = gateway_pb2_grpc.GatewayStub(gateway_stage.channel())
    result = outcome(lambda: stub.ListJobs(gateway_pb2.ListJobsRequest(page_token=token), timeout=CALL_TIMEOUT))
    check_refusal(result, INVALID, f"page_token {token!r}")


@pytest.mark.parametrize("seconds", [1e308, "1e308", 1e30])
def test_regression_a_huge_number_of_seconds_is_a_400(http_gateway, seconds) -> None:
    """round(1e308 * fps) raised OverflowError: a 500."""
    answer = requests.post(http_gateway.http_url + "/v1/videos", json={"prompt": "x", "seconds": seconds}, timeout=30)
    assert "frames are accepted" in http_error(answer, 400, "seconds")["message"]


def test_regression_errors_of_content_and_events_are_documented_as_json(http_gateway) -> None:
    """FastAPI documented the errors of /content as video/mp4 and of /events as text/event-stream."""
    paths = requests.get(http_gateway.http_url + "/openapi.json", timeout=30).json()["paths"]
    for path in ("/v1/videos/{video_id}/content", "/v1/videos/{video_id}/events"):
        for status, answer in paths[path]["get"]["responses"].items():
            if status.startswith("4"):
                assert list(answer["content"]) == ["application/json"], (path, status)
