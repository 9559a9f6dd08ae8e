"""``t2v up``: start the four services as separate processes on loopback, wait until every one
reports SERVING over grpc.health.v1, and stop them all cleanly on Ctrl-C (SIGTERM, then SIGKILL).

Each service also serves Prometheus ``/metrics`` over HTTP on its gRPC port + 100
(gateway 50150, text_encoder 50151, denoiser 50152, decoder 50153 with the default ports), and the
gateway serves its HTTP API and web page on its gRPC port + 30 (http://127.0.0.1:50080/).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

STAGES = ("text_encoder", "denoiser", "decoder", "gateway")
METRICS_PORT_OFFSET = 100   # each service's /metrics HTTP port = its gRPC port + this
HTTP_PORT_OFFSET = 30       # the gateway's HTTP API and web page = its gRPC port + this (50080)
DENOISER_PORT_STEP = 10     # the denoiser of the i-th GPU (or pair, with CFG-parallel) listens on its port + 10*i
SLOTS_PER_DENOISER = 4      # the gateway's --slots with several denoisers: this many jobs for each


def parse_gpus(text: str, available: int) -> tuple[int, ...]:
    """--gpus: "all" (every GPU torch sees), or indices "0,1,3"; ValueError with a sentence otherwise."""
    if text.strip().lower() == "all":
        if available < 1:
            raise ValueError("--gpus all: torch sees no GPU on this machine; leave --gpus out to run on the CPU")
        return tuple(range(available))
    try:
        gpus = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ValueError(f"--gpus {text!r} is not 'all' or GPU indices such as 0,1") from None
    bad = [g for g in gpus if not 0 <= g < available]
    if not gpus or bad or len(set(gpus)) != len(gpus):
        raise ValueError(f"--gpus {text!r}: give distinct indices of the {available} GPU(s) here (0..{available - 1})")
    return gpus


class StartError(RuntimeError):
    """A service did not come up; the message says which and why."""


@dataclass(frozen=True)
class MeshPorts:
    gateway: int = 50050
    text_encoder: int = 50051
    denoiser: int = 50052
    decoder: int = 50053

    @classmethod
    def from_base(cls, base: int) -> "MeshPorts":
        return cls(base, base + 1, base + 2, base + 3)


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it): for meshes started by tests and benchmarks."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def health_status(address: str, timeout: float = 1.0) -> int | None:
    """The grpc.health.v1 status of the server at ``address``, or None if it does not answer."""
    try:
        with grpc.insecure_channel(address) as channel:
            response = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
            return response.status
    except grpc.RpcError:
        return None


@dataclass
class Mesh:
    host: str
    ports: MeshPorts
    model: str
    device: str = "auto"
    dtype: str = "auto"
    log_dir: Path | None = None
    extra_args: dict[str, list[str]] = field(default_factory=dict)
    metrics_offset: int = METRICS_PORT_OFFSET   # -1: no /metrics endpoints
    http_offset: int = HTTP_PORT_OFFSET         # -1: no HTTP API and web page on the gateway
    state_dir: Path | None = None               # the gateway's jobs and videos; see gateway_state_dir
    job_store: str = ""                         # the gateway's --job-store ("" = SQLite in the state dir)
    env: dict[str, str] | None = None           # extra environment variables for every service
    gpus: tuple[int, ...] = ()                  # a denoiser per GPU (per pair with cfg_parallel); () = one, --device
    cfg_parallel: bool = False                  # each denoiser runs CFG-parallel on two GPUs of ``gpus``
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    _logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def denoiser_gpus(self) -> list[tuple[int, ...]]:
        """The GPUs of each denoiser: one each, or pairs with CFG-parallel (an odd last GPU is left out)."""
        if not self.cfg_parallel:
            return [(gpu,) for gpu in self.gpus]
        return [tuple(self.gpus[i:i + 2]) for i in range(0, len(self.gpus) - 1, 2)]

    @property
    def names(self) -> list[str]:
        """Every process: the stages, a denoiser per GPU (``denoiser``, ``denoiser-1``, ...), the gateway last."""
        extra = [f"denoiser-{i}" for i in range(1, len(self.denoiser_gpus))]
        return ["text_encoder", "denoiser", *extra, "decoder", "gateway"]

    def _port(self, name: str) -> int:
        stage, _, index = name.partition("-")
        return getattr(self.ports, stage) + DENOISER_PORT_STEP * int(index or 0)

    def address(self, stage: str) -> str:
        return f"{self.host}:{self._port(stage)}"

    def denoiser_target(self) -> str:
        """The gateway's --denoiser: one address, or every denoiser's (round_robin spreads the jobs)."""
        denoisers = [name for name in self.names if name.startswith("denoiser")]
        if len(denoisers) == 1:
            return self.address("denoiser")
        return "ipv4:" + ",".join(self.address(name) for name in denoisers)

    def metrics_port(self, stage: str) -> int | None:
        return self._port(stage) + self.metrics_offset if self.metrics_offset >= 0 else None

    @property
    def web_url(self) -> str | None:
        """The gateway's web page (its HTTP API is under /v1/videos there); None when it is off."""
        if self.http_offset < 0:
            return None
        return f"http://{self.host}:{self.ports.gateway + self.http_offset}/"

    @property
    def gateway_state_dir(self) -> Path:
        """``state_dir``, else ``<log_dir>/state`` (a run that keeps logs keeps its jobs beside them),
        else ``out/state``: the same folder each time, so jobs survive a restart of the mesh."""
        if self.state_dir is not None:
            return self.state_dir
        return self.log_dir / "state" if self.log_dir is not None else Path("out/state")

    def command(self, name: str) -> list[str]:
        stage, _, index = name.partition("-")
        args = [sys.executable, "-m", "t2v", "serve", stage, "--host", self.host,
                "--port", str(self._port(name)), "--model", self.model]
        if self.metrics_port(name) is not None:
            args += [f"--metrics-port={self.metrics_port(name)}"]
        if stage == "gateway":
            args += [f"--text-encoder={self.address('text_encoder')}", f"--denoiser={self.denoiser_target()}",
                     f"--decoder={self.address('decoder')}"]
            if self.gpus:
                args += [f"--slots={SLOTS_PER_DENOISER * len(self.denoiser_gpus)}"]
            args += [f"--state-dir={self.gateway_state_dir}"]
            if self.job_store:
                args += [f"--job-store={self.job_store}"]
            if self.http_offset >= 0:
                args += [f"--http-port={self.ports.gateway + self.http_offset}"]
        elif self.gpus and stage == "denoiser":
            gpus = self.denoiser_gpus[int(index or 0)]
            args += ["--gpu", str(gpus[0]), "--dtype", self.dtype]
            if len(gpus) == 2:
                args += ["--cfg-parallel", "true", "--cfg-parallel-device", f"cuda:{gpus[1]}"]
        elif self.gpus:                   # the text encoder and the decoder share the first GPU
            args += ["--device", f"cuda:{self.gpus[0]}", "--dtype", self.dtype]
        else:
            args += ["--device", self.device, "--dtype", self.dtype]
        return args + self.extra_args.get(stage, [])

    def start(self, timeout: float = 300.0, echo: IO[str] = sys.stderr) -> None:
        """Start every stage, then wait until all are SERVING; raise StartError otherwise."""
        for stage in self.names:
            output: int | IO[bytes] | None = None
            if self.log_dir is not None:
                self.log_dir.mkdir(parents=True, exist_ok=True)
                output = open(self.log_dir / f"{stage}.log", "wb")  # noqa: SIM115 - closed in stop()
                self._logs.append(output)
            self.processes[stage] = subprocess.Popen(self.command(stage), stdout=output, stderr=output,
                                                     start_new_session=True,
                                                     env={**os.environ, **self.env} if self.env else None)
        deadline = time.monotonic() + timeout
        waiting = list(self.names)
        while waiting:
            for stage in list(waiting):
                code = self.processes[stage].poll()
                if code is not None:
                    raise StartError(f"{stage} exited with code {code} while starting{self._log_hint(stage)}")
                if health_status(self.address(stage)) == health_pb2.HealthCheckResponse.SERVING:
                    metrics = self.metrics_port(stage)
                    notes = [f"metrics http://{self.host}:{metrics}/metrics"] if metrics else []
                    if stage == "gateway" and self.web_url:
                        notes.append(f"web page {self.web_url}")
                    echo.write(f"{stage:<13} SERVING on {self.address(stage)}"
                               + (f" ({'; '.join(notes)})" if notes else "") + "\n")
                    waiting.remove(stage)
            if waiting and time.monotonic() > deadline:
                raise StartError(f"{', '.join(waiting)} not SERVING after {timeout:.0f} s{self._log_hint(waiting[0])}")
            if waiting:
                time.sleep(0.2)

    def _log_hint(self, stage: str) -> str:
        if self.log_dir is None:
            return " (its log is above)"
        path = self.log_dir / f"{stage}.log"
        tail = path.read_text(errors="replace").strip().splitlines()[-5:] if path.exists() else []
        return f"; last lines of {path}:\n  " + "\n  ".join(tail)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM every service (gateway first), wait up to ``grace`` seconds, then SIGKILL."""
        for stage in reversed(self.names):
            proc = self.processes.get(stage)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for proc in self.processes.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        for log in self._logs:
            log.close()

    def wait_any_exit(self) -> tuple[str, int] | None:
        """Block until a service exits (returns it) or a signal interrupts (returns None)."""
        while True:
            for stage, proc in self.processes.items():
                code = proc.poll()
                if code is not None:
                    return stage, code
            time.sleep(0.5)
