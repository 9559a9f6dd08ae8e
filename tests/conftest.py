"""Shared fixtures: real gRPC servers on loopback ports chosen at run time, the embedded model."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
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
from services.gateway.app import model_default_size  # noqa: E402
from services.common.server import GrpcServer, message_options  # noqa: E402
from t2v.up import free_port  # noqa: E402,F401 - tests import it from here


def free_base_port() -> int:
    """A port P with P..P+3 (gRPC), P+30 (HTTP) and P+100..P+103 (metrics) free: what `t2v up --port P` takes."""
    for _ in range(200):
        base = random.randrange(20000, 40000)
        try:
            for port in (*range(base, base + 4), base + 30, *range(base + 100, base + 104)):
                with socket.socket() as sock:
                    sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise AssertionError("no free range of ports for `t2v up --port`")


# The embedded model's sizes, read from its folder, so no test hard-codes them.
EMBEDDING_DIM: int = json.loads(
    (Path(DEFAULT_MODEL) / "text_encoder" / "config.json").read_text())["hidden_size"]
DEFAULT_SIZE: int = model_default_size(DEFAULT_MODEL)     # height and width when a request leaves them 0


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


def http_call(url: str, method: str = "GET", body: dict | None = None, headers: dict[str, str] | None = None,
              timeout: float = 30) -> tuple[int, bytes]:
    """One HTTP request (a JSON body when given): its status and body, an error status included."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={**({"Content-Type": "application/json"} if data else {}),
                                              **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.read()


def start_stage(servicer: Any, service_name: str, add: Callable[[Any, grpc.Server], None],
                load: bool = True, interceptors: list[grpc.ServerInterceptor] | None = None) -> RunningStage:
    metrics = getattr(servicer, "metrics", None)    # as serve() does: /metrics, model load, the stream cap
    server = GrpcServer(servicer.config, service_name, lambda s: add(servicer, s), interceptors, metrics,
                        getattr(servicer, "streams_hint", ""), getattr(servicer, "tracing", None))
    port = server.start()
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


def start_text_encoder(**config: Any) -> RunningStage:
    """A text_encoder stage on CPU float32 (``config`` overrides its TextEncoderConfig)."""
    from services.text_encoder.server import SERVICE_NAME, TextEncoderConfig, TextEncoderServicer
    from t2v.v1 import text_encoder_pb2_grpc

    return start_stage(TextEncoderServicer(TextEncoderConfig(**{"port": 0, "device": "cpu", "dtype": "float32",
                                                                 **config})),
                       SERVICE_NAME, text_encoder_pb2_grpc.add_TextEncoderServicer_to_server)


def start_denoiser(**config: Any) -> RunningStage:
    """A denoiser stage on CPU float32 batching up to 4 requests (``config`` overrides its DenoiserConfig);
    stop it with ``stop_stage``."""
    from services.denoiser.server import SERVICE_NAME, DenoiserConfig, DenoiserServicer
    from t2v.v1 import denoiser_pb2_grpc

    return start_stage(DenoiserServicer(DenoiserConfig(**{"port": 0, "device": "cpu", "dtype": "float32",
                                                          "max_batch": 4, **config})),
                       SERVICE_NAME, denoiser_pb2_grpc.add_DenoiserServicer_to_server)


def start_decoder(**config: Any) -> RunningStage:
    """A decoder stage on CPU float32 (``config`` overrides its DecoderConfig)."""
    from services.decoder.server import SERVICE_NAME, DecoderConfig, DecoderServicer
    from t2v.v1 import decoder_pb2_grpc

    return start_stage(DecoderServicer(DecoderConfig(**{"port": 0, "device": "cpu", "dtype": "float32", **config})),
                       SERVICE_NAME, decoder_pb2_grpc.add_DecoderServicer_to_server)


def stop_stage(stage: RunningStage) -> None:
    """Stop a stage started here: its server, its /metrics endpoint if any, the denoiser's engine."""
    stage.server.stop(0)
    metrics = getattr(stage.servicer, "metrics", None)
    if metrics is not None:
        metrics.stop_http()
    close = getattr(stage.servicer, "close", None)
    if close is not None:
        close(1.0)


@pytest.fixture(scope="session")
def text_encoder_stage() -> Iterator[RunningStage]:
    stage = start_text_encoder()
    yield stage
    stop_stage(stage)


@pytest.fixture(scope="session")
def denoiser_stage() -> Iterator[RunningStage]:
    stage = start_denoiser()
    yield stage
    stop_stage(stage)


@pytest.fixture(scope="session")
def decoder_stage() -> Iterator[RunningStage]:
    stage = start_decoder()
    yield stage
    stop_stage(stage)


_OWN_STATE_PREFIX = "t2v-gateway-state-"


def start_gateway(text_encoder: str, denoiser: str, decoder: str, observer: Any = None,
                  **overrides: Any) -> RunningStage:
    """A gateway in front of the given stages; its jobs live in a fresh temporary state dir unless
    ``state_dir`` is given. Stop it with ``stop_gateway``."""
    from services.gateway.app import Gateway, GatewayConfig, interceptors_from
    from services.gateway.server import SERVICE_NAME
    from t2v.v1 import gateway_pb2_grpc

    if "state_dir" not in overrides:
        overrides["state_dir"] = tempfile.mkdtemp(prefix=_OWN_STATE_PREFIX)
    config = GatewayConfig(port=0, text_encoder=text_encoder, denoiser=denoiser, decoder=decoder, **overrides)
    gateway = Gateway(config, observer)
    return start_stage(gateway, SERVICE_NAME,
                       lambda gw, server: gateway_pb2_grpc.add_GatewayServicer_to_server(gw.servicer, server),
                       interceptors=interceptors_from(config, gateway.rate_limiter))


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


# --- services as processes of their own: what SIGKILL, SIGSTOP and SIGTERM need (tests/integration/test_faults.py)
STAGE_PROCESS_ARGS = ("--device", "cpu", "--dtype", "float32")


@dataclass
class ServiceProcess:
    """A service run as ``python -m t2v serve NAME`` on loopback: a real OS process to kill, stop or drain."""

    name: str
    proc: subprocess.Popen
    log_path: Path
    port: int = 0                         # 0 until ``wait_serving`` read it from the log

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str = "", timeout: float = 2.0) -> int | None:
        """grpc.health.v1 status of ``service`` ("" = the server), or None when it does not answer."""
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        try:
            with grpc.insecure_channel(self.address) as channel:
                return health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=service), timeout=timeout).status
        except grpc.RpcError:
            return None

    def wait_serving(self, timeout: float = 120.0) -> "ServiceProcess":
        """Wait for the log's ``event=serving`` (health SERVING), learning the port; fail if it exits."""
        def serving() -> bool:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}:\n{self.log()[-3000:]}")
            match = re.search(r"event=serving address=\S+:(\d+)", self.log())
            if match:
                self.port = int(match.group(1))
            return match is not None
        wait_for(serving, timeout, f"{self.name} to be SERVING")
        return self

    def signal(self, sig: int) -> None:
        os.kill(self.proc.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap (a stopped process dies too, without running again); a no-op once it exited."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    """``spawn(NAME, *args, port=0)`` starts ``t2v serve NAME`` (a stage on the CPU in float32) as a process of
    its own, logging to a file under tmp_path; it does not wait (``.wait_serving()``). Every process started
    is killed after the test, whether it passed or not."""
    started: list[ServiceProcess] = []

    def start(name: str, *args: str, port: int = 0) -> ServiceProcess:
        log_path = tmp_path / f"{name}-{len(started)}.log"
        command = [sys.executable, "-m", "t2v", "serve", name, "--host", "127.0.0.1", "--port", str(port),
                   *(STAGE_PROCESS_ARGS if name != "gateway" else ()), *args]
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                    # one torch thread each: several processes share a small machine
                                    env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                                         "OMP_NUM_THREADS": "1"})
        started.append(ServiceProcess(name, proc, log_path, port))
        return started[-1]

    yield start
    for process in started:
        process.kill()


from tests.postgres import postgres_server, postgres_dsn  # noqa: E402,F401
