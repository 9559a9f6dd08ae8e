"""Shared fixtures: real gRPC servers on loopback ports chosen at run time, the embedded model."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
import pytest  # noqa: E402

from services.common.config import DEFAULT_MODEL  # noqa: E402
from services.common.server import GrpcServer, message_options  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class RunningStage:
    """A real server on a loopback port, with its servicer, for calling over gRPC."""

    server: GrpcServer
    servicer: Any
    port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.address, options=message_options(64 * 1024 * 1024))


def start_stage(servicer: Any, service_name: str, add: Callable[[Any, grpc.Server], None],
                load: bool = True) -> RunningStage:
    server = GrpcServer(servicer.config, service_name, lambda s: add(servicer, s))
    port = server.start()
    if load:
        servicer.load()
        servicer.gate.open()
        server.set_serving(True)
    return RunningStage(server, servicer, port)


@pytest.fixture(scope="session")
def model_dir() -> str:
    return DEFAULT_MODEL


@pytest.fixture(scope="session")
def text_encoder_stage() -> Iterator[RunningStage]:
    from services.text_encoder.server import SERVICE_NAME, TextEncoderConfig, TextEncoderServicer
    from t2v.v1 import text_encoder_pb2_grpc

    stage = start_stage(TextEncoderServicer(TextEncoderConfig(port=0, device="cpu", dtype="float32")),
                        SERVICE_NAME, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server)
    yield stage
    stage.server.stop(0)


@pytest.fixture(scope="session")
def denoiser_stage() -> Iterator[RunningStage]:
    from services.denoiser.server import SERVICE_NAME, DenoiserConfig, DenoiserServicer
    from t2v.v1 import denoiser_pb2_grpc

    stage = start_stage(DenoiserServicer(DenoiserConfig(port=0, device="cpu", dtype="float32", max_batch=4)),
                        SERVICE_NAME, denoiser_pb2_grpc.add_DenoiserServicer_to_server)
    yield stage
    stage.server.stop(0)
    stage.servicer.close(1.0)


@pytest.fixture(scope="session")
def decoder_stage() -> Iterator[RunningStage]:
    from services.decoder.server import SERVICE_NAME, DecoderConfig, DecoderServicer
    from t2v.v1 import decoder_pb2_grpc

    stage = start_stage(DecoderServicer(DecoderConfig(port=0, device="cpu", dtype="float32")),
                        SERVICE_NAME, decoder_pb2_grpc.add_DecoderServicer_to_server)
    yield stage
    stage.server.stop(0)


def start_gateway(text_encoder: str, denoiser: str, decoder: str, **overrides: Any) -> RunningStage:
    from services.gateway.server import SERVICE_NAME, GatewayConfig, GatewayServicer
    from t2v.v1 import gateway_pb2_grpc

    config = GatewayConfig(port=0, text_encoder=text_encoder, denoiser=denoiser, decoder=decoder, **overrides)
    return start_stage(GatewayServicer(config), SERVICE_NAME, gateway_pb2_grpc.add_GatewayServicer_to_server)


@pytest.fixture(scope="session")
def gateway_stage(text_encoder_stage: RunningStage, denoiser_stage: RunningStage,
                  decoder_stage: RunningStage) -> Iterator[RunningStage]:
    stage = start_gateway(text_encoder_stage.address, denoiser_stage.address, decoder_stage.address)
    yield stage
    stage.server.stop(0)
    stage.servicer.orchestrator.close()
