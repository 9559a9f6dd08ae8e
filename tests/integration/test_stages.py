"""Each real server on a loopback port, called over gRPC: answers, bad input, health, reflection (v1 and v1alpha)."""

from __future__ import annotations

from typing import Any

import grpc
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from grpc_tools import protoc

from services.common.tensors import from_proto, to_proto
from t2v.v1 import (decoder_pb2, decoder_pb2_grpc, denoiser_pb2, denoiser_pb2_grpc, tensor_pb2, text_encoder_pb2,
                    text_encoder_pb2_grpc)
from tests.conftest import EMBEDDING_DIM

pytestmark = pytest.mark.slow


def status_of(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        result = call()
        if hasattr(result, "__iter__") and not isinstance(result, (bytes, str)):
            list(result)
    return info.value.code(), info.value.details()


# --- text encoder -----------------------------------------------------------------------------

def test_text_encoder_encodes_a_batch_and_reports_truncation(text_encoder_stage):
    stub = text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel())
    long_prompt = "a very long prompt " * 30
    response = stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["", "a cat", long_prompt]), timeout=30)
    embeddings = from_proto(response.embeddings)
    assert embeddings.shape == (3, 77, EMBEDDING_DIM)
    assert [p.truncated for p in response.prompts] == [False, False, True]
    assert response.prompts[1].num_tokens == 4          # <start> a cat <end>
    assert "long prompt" in response.prompts[2].dropped_text


def test_text_encoder_refuses_bad_input_and_keeps_serving(text_encoder_stage):
    stub = text_encoder_pb2_grpc.TextEncoderStub(text_encoder_stage.channel())
    code, details = status_of(lambda: stub.Encode(text_encoder_pb2.EncodeRequest(prompts=[]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "at least one prompt" in details
    code, details = status_of(lambda: stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["x" * 100_001]), timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "characters" in details
    assert stub.Encode(text_encoder_pb2.EncodeRequest(prompts=["ok"]), timeout=10).embeddings.shape


# --- denoiser ---------------------------------------------------------------------------------

def denoise_request(**overrides) -> denoiser_pb2.DenoiseRequest:
    fields = dict(request_id="t", embeddings=to_proto(torch.randn(2, 77, EMBEDDING_DIM)), num_frames=2, height=32, width=32,
                  num_inference_steps=3, guidance_scale=9.0, seed=1, scheduler="ddim")
    fields.update(overrides)
    return denoiser_pb2.DenoiseRequest(**fields)


def test_denoiser_streams_one_event_per_step_then_latents(denoiser_stage):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    events = list(stub.Denoise(denoise_request(num_inference_steps=4), timeout=60))
    assert [e.progress.step for e in events[:-1]] == [1, 2, 3, 4]
    assert all(e.progress.total_steps == 4 for e in events[:-1])
    assert from_proto(events[-1].latents).shape == (1, 4, 2, 4, 4)


@pytest.mark.parametrize("overrides,words", [
    ({"num_frames": 0}, "num_frames"),
    ({"num_frames": 65}, "num_frames"),
    ({"height": 36}, "multiple of 8"),
    ({"width": 2048}, "width"),
    ({"num_inference_steps": 0}, "num_inference_steps"),
    ({"guidance_scale": -1.0}, "guidance_scale"),
    ({"scheduler": "euler"}, "scheduler"),
    ({"embeddings": to_proto(torch.randn(2, 77, 16))}, "embeddings have shape"),
    ({"embeddings": to_proto(torch.randn(1, 77, EMBEDDING_DIM))}, "embeddings have shape"),
    ({"embeddings": tensor_pb2.Tensor(data=b"\0" * 16, shape=[2, 77, EMBEDDING_DIM], dtype=tensor_pb2.DTYPE_FLOAT32)},
     "bytes"),
    ({"embeddings": tensor_pb2.Tensor(data=b"\0" * 8, shape=[2], dtype=tensor_pb2.DTYPE_UNSPECIFIED)}, "dtype"),
    ({"embeddings": to_proto(torch.full((2, 77, EMBEDDING_DIM), float("nan")))}, "NaN"),
])
def test_denoiser_refuses_bad_input_and_keeps_serving(denoiser_stage, overrides, words):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    code, details = status_of(lambda: stub.Denoise(denoise_request(**overrides), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert words in details
    assert list(stub.Denoise(denoise_request(num_inference_steps=1), timeout=30))[-1].HasField("latents")


def test_denoiser_accepts_half_precision_embeddings(denoiser_stage):
    stub = denoiser_pb2_grpc.DenoiserStub(denoiser_stage.channel())
    request = denoise_request(embeddings=to_proto(torch.randn(2, 77, EMBEDDING_DIM).half()), num_inference_steps=1)
    assert list(stub.Denoise(request, timeout=30))[-1].HasField("latents")


# --- decoder ----------------------------------------------------------------------------------

def test_decoder_returns_an_mp4_and_the_frames(decoder_stage):
    import io

    import av

    stub = decoder_pb2_grpc.DecoderStub(decoder_stage.channel())
    response = stub.Decode(decoder_pb2.DecodeRequest(latents=to_proto(torch.randn(1, 4, 5, 8, 6)), fps=12,
                                                     return_frames=True), timeout=30)
    assert response.mime_type == "video/mp4" and (response.num_frames, response.height, response.width) == (5, 64, 48)
    frames = from_proto(response.frames)
    assert frames.shape == (5, 64, 48, 3) and 0.0 <= float(frames.min()) and float(frames.max()) <= 1.0
    with av.open(io.BytesIO(response.video)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264" and stream.codec_context.pix_fmt == "yuv420p"
        assert int(stream.average_rate) == 12
        assert sum(1 for _ in container.decode(stream)) == 5


@pytest.mark.parametrize("request_fields,words", [
    ({"latents": to_proto(torch.randn(1, 3, 2, 8, 8)), "fps": 8}, "expected [1, 4"),
    ({"latents": to_proto(torch.randn(4, 2, 8, 8)), "fps": 8}, "expected [1, 4"),
    ({"latents": to_proto(torch.randn(1, 4, 2, 8, 8)), "fps": 0}, "fps"),
    ({"latents": to_proto(torch.full((1, 4, 2, 8, 8), float("inf"))), "fps": 8}, "NaN or Inf"),
    ({"latents": tensor_pb2.Tensor(data=b"", shape=[1, 4, 0, 8, 8], dtype=tensor_pb2.DTYPE_FLOAT32), "fps": 8},
     "positive"),
])
def test_decoder_refuses_bad_input_and_keeps_serving(decoder_stage, request_fields, words):
    stub = decoder_pb2_grpc.DecoderStub(decoder_stage.channel())
    code, details = status_of(lambda: stub.Decode(decoder_pb2.DecodeRequest(**request_fields), timeout=30))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and words in details
    ok = stub.Decode(decoder_pb2.DecodeRequest(latents=to_proto(torch.randn(1, 4, 1, 8, 8)), fps=8), timeout=30)
    assert ok.video


# --- every server -----------------------------------------------------------------------------

@pytest.mark.parametrize("fixture,service", [("text_encoder_stage", "t2v.v1.TextEncoder"),
                                             ("denoiser_stage", "t2v.v1.Denoiser"),
                                             ("decoder_stage", "t2v.v1.Decoder"),
                                             ("gateway_stage", "t2v.v1.Gateway")])
def test_health_and_reflection(request, fixture, service):
    stage = request.getfixturevalue(fixture)
    channel = stage.channel()
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status == \
        health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
    answers = list(reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                   timeout=5))
    names = {s.name for s in answers[0].list_services_response.service}
    assert {service, "grpc.health.v1.Health"} <= names


# grpc-proto's grpc/reflection/v1/reflection.proto, the parts a client uses: compiled here by protoc, so the v1
# client below owes nothing to how the server makes its own v1 descriptor.
REFLECTION_V1_PROTO = """
syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse { string base_type_name = 1; repeated int32 extension_number = 2; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
"""


@pytest.fixture(scope="module")
def reflection_v1(tmp_path_factory: pytest.TempPathFactory) -> descriptor_pb2.FileDescriptorProto:
    """The upstream v1 proto above, compiled by protoc (grpcio-tools)."""
    folder = tmp_path_factory.mktemp("reflection-v1")
    (folder / "grpc" / "reflection" / "v1").mkdir(parents=True)
    (folder / "grpc" / "reflection" / "v1" / "reflection.proto").write_text(REFLECTION_V1_PROTO)
    out = folder / "set.pb"
    assert protoc.main(["protoc", f"-I{folder}", f"--descriptor_set_out={out}",
                        "grpc/reflection/v1/reflection.proto"]) == 0
    return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]


def _classes(files: list[descriptor_pb2.FileDescriptorProto], *names: str) -> list[Any]:
    pool = descriptor_pool.DescriptorPool()
    for file in files:
        pool.Add(file)
    return [message_factory.GetMessageClass(pool.FindMessageTypeByName(name)) for name in names]


@pytest.mark.parametrize("fixture,service,method", [("text_encoder_stage", "t2v.v1.TextEncoder", "Encode"),
                                                    ("denoiser_stage", "t2v.v1.Denoiser", "Denoise"),
                                                    ("decoder_stage", "t2v.v1.Decoder", "Decode"),
                                                    ("gateway_stage", "t2v.v1.Gateway", "DeleteJob")])
def test_reflection_answers_as_v1_and_as_v1alpha(request, reflection_v1, fixture, service, method):
    """A v1 client (messages from the upstream proto, over a raw stream of the loopback channel) and
    grpcio-reflection's own v1alpha client both list the services and describe them."""
    channel = request.getfixturevalue(fixture).channel()
    Request, Response = _classes([reflection_v1], "grpc.reflection.v1.ServerReflectionRequest",
                                 "grpc.reflection.v1.ServerReflectionResponse")
    info = channel.stream_stream("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                                 request_serializer=Request.SerializeToString,
                                 response_deserializer=Response.FromString)
    listed, described, itself = info(iter([Request(list_services=""), Request(file_containing_symbol=service),
                                           Request(file_containing_symbol="grpc.reflection.v1.ServerReflection")]),
                                     timeout=10)
    names = {s.name for s in listed.list_services_response.service}
    assert {service, "grpc.health.v1.Health", "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection"} <= names
    files = [descriptor_pb2.FileDescriptorProto.FromString(raw)
             for raw in described.file_descriptor_response.file_descriptor_proto]
    pool = descriptor_pool.DescriptorPool()
    for file in sorted(files, key=lambda f: len(f.dependency)):     # dependencies first
        pool.Add(file)
    assert method in pool.FindServiceByName(service).methods_by_name
    served = [descriptor_pb2.FileDescriptorProto.FromString(raw)
              for raw in itself.file_descriptor_response.file_descriptor_proto]
    assert [(f.name, f.package) for f in served] == [("grpc/reflection/v1/reflection.proto", "grpc.reflection.v1")]

    def fields(file: descriptor_pb2.FileDescriptorProto) -> dict[str, list[tuple[str, int, int, str]]]:
        return {m.name: [(f.name, f.number, f.type, f.type_name) for f in m.field] for m in file.message_type}
    assert fields(served[0]) == fields(reflection_v1)          # the server's v1 is the upstream v1, field for field
    assert served[0].service[0].method[0].input_type == ".grpc.reflection.v1.ServerReflectionRequest"

    database = ProtoReflectionDescriptorDatabase(channel)        # grpcio-reflection's own client: v1alpha
    assert {service, "grpc.reflection.v1alpha.ServerReflection"} <= set(database.get_services())
    v1alpha_pool = descriptor_pool.DescriptorPool(database)
    assert method in v1alpha_pool.FindServiceByName(service).methods_by_name


def test_a_server_is_not_serving_until_its_model_is_loaded():
    from services.common.server import GrpcServer
    from services.denoiser.server import SERVICE_NAME, DenoiserConfig, DenoiserServicer

    servicer = DenoiserServicer(DenoiserConfig(port=0, device="cpu"))
    server = GrpcServer(servicer.config, SERVICE_NAME,
                        lambda s: denoiser_pb2_grpc.add_DenoiserServicer_to_server(servicer, s))
    port = server.start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
        assert status == health_pb2.HealthCheckResponse.NOT_SERVING
        code, details = status_of(lambda: denoiser_pb2_grpc.DenoiserStub(channel).Denoise(denoise_request(), timeout=5))
        assert code == grpc.StatusCode.UNAVAILABLE and "still loading" in details
    finally:
        server.stop(0)


def test_messages_larger_than_4_mib_pass(text_encoder_stage, decoder_stage):
    """Message limits come from config (64 MiB here), not gRPC's 4 MiB default."""
    stub = decoder_pb2_grpc.DecoderStub(decoder_stage.channel())
    latents = to_proto(torch.randn(1, 4, 8, 64, 64) * 0.1)    # 8 frames of 512x512 float32 out: 25 MiB
    response = stub.Decode(decoder_pb2.DecodeRequest(latents=latents, fps=8, return_frames=True), timeout=120)
    assert response.frames.ByteSize() > 4 * 1024 * 1024
