"""Shared fixtures: real gRPC servers on loopback ports chosen at run time, the embedded model."""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import grpc  # noqa: E402
import pytest  # noqa: E402

from services.common.config import DEFAULT_MODEL  # noqa: E402
from services.common.server import GrpcServer, message_options  # noqa: E402


def wait_for(predicate: Callable[[], Any], timeout: float = 60.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


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

    @property
    def metrics_url(self) -> str:
        """``/metrics`` of a stage started with ``metrics_port`` >= 0 in its config."""
        return f"http://127.0.0.1:{self.servicer.metrics.http_port}/metrics"

    @property
    def http_url(self) -> str:
        """The HTTP API of a gateway started with ``http_port`` >= 0, without the trailing slash."""
        return self.servicer.http.url.rstrip("/")


def start_stage(servicer: Any, service_name: str, add: Callable[[Any, grpc.Server], None],
                load: bool = True, interceptors: list[grpc.ServerInterceptor] | None = None) -> RunningStage:
    server = GrpcServer(servicer.config, service_name, lambda s: add(servicer, s), interceptors)
    port = server.start()
    metrics = getattr(servicer, "metrics", None)    # as serve() does: /metrics, model load
    if metrics is not None and getattr(servicer.config, "metrics_port", -1) >= 0:
        metrics.serve_http("127.0.0.1", servicer.config.metrics_port)
    if load:
        started = time.monotonic()
        servicer.load()
        servicer.gate.open()
        server.set_serving(True)
        if metrics is not None:
            metrics.model_loaded(time.monotonic() - started)
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


_OWN_STATE_PREFIX = "t2v-gateway-state-"


def start_gateway(text_encoder: str, denoiser: str, decoder: str, observer: Any = None,
                  **overrides: Any) -> RunningStage:
    """A gateway in front of the given stages; its jobs live in a fresh temporary state dir unless
    ``state_dir`` is given. Stop it with ``stop_gateway``."""
    from services.gateway.server import SERVICE_NAME, GatewayConfig, GatewayServicer, interceptors_from
    from t2v.v1 import gateway_pb2_grpc

    if "state_dir" not in overrides:
        overrides["state_dir"] = tempfile.mkdtemp(prefix=_OWN_STATE_PREFIX)
    config = GatewayConfig(port=0, text_encoder=text_encoder, denoiser=denoiser, decoder=decoder, **overrides)
    return start_stage(GatewayServicer(config, observer), SERVICE_NAME,
                       gateway_pb2_grpc.add_GatewayServicer_to_server, interceptors=interceptors_from(config))


def stop_gateway(stage: RunningStage) -> None:
    """Stop the server, then its job system (running jobs are interrupted, kept for a successor)."""
    stage.server.stop(0)
    stage.servicer.close(0)
    state_dir = Path(stage.servicer.config.state_dir)
    if state_dir.name.startswith(_OWN_STATE_PREFIX):     # made by start_gateway, not passed in by a test
        shutil.rmtree(state_dir, ignore_errors=True)


@pytest.fixture(scope="session")
def gateway_stage(text_encoder_stage: RunningStage, denoiser_stage: RunningStage,
                  decoder_stage: RunningStage) -> Iterator[RunningStage]:
    stage = start_gateway(text_encoder_stage.address, denoiser_stage.address, decoder_stage.address)
    yield stage
    stop_gateway(stage)


@pytest.fixture
def gateway_factory(text_encoder_stage: RunningStage, denoiser_stage: RunningStage, decoder_stage: RunningStage,
                    tmp_path: Any) -> Iterator[Callable[..., RunningStage]]:
    """Start gateways in front of the session's stages (each with its own state dir unless told);
    after the test, stop them and wait until the denoiser holds none of their requests."""
    started: list[RunningStage] = []

    def make(**overrides: Any) -> RunningStage:
        overrides.setdefault("state_dir", str(tmp_path / f"state{len(started)}"))
        stages = {name: overrides.pop(name, default) for name, default in [
            ("text_encoder", text_encoder_stage.address), ("denoiser", denoiser_stage.address),
            ("decoder", decoder_stage.address)]}
        gateway = start_gateway(**stages, **overrides)
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        stop_gateway(gateway)
    engine = denoiser_stage.servicer.engine
    wait_for(lambda: engine.active_jobs() == 0, 30, "the denoiser to drop every request of the test")
