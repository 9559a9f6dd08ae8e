"""Server bootstrap shared by every service: health, reflection, message limits, graceful stop.

Why here: the four services differ only in their servicer and their model; how they start, report
readiness (grpc.health.v1 is NOT_SERVING until the model is loaded) and stop (SIGTERM -> refuse new
calls, let in-flight ones finish for ``grace_seconds``) must be identical and tested once.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent import futures
from typing import Callable, Protocol

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common.config import ServerConfig, describe
from services.common.errors import Unavailable
from services.common.logs import kv, setup_logging
from services.common.metrics import metrics_of


def message_options(max_bytes: int) -> list[tuple[str, int]]:
    """The same limit on both ends of every channel; never the 4 MiB default."""
    return [("grpc.max_send_message_length", max_bytes), ("grpc.max_receive_message_length", max_bytes)]


def connection_age_options(seconds: float) -> list[tuple[str, int]]:
    """Why: a gateway's round_robin channel resolves a headless Service only when a connection drops;
    ageing connections out makes it pick up replicas added by the autoscaler. A long Denoise stream in
    flight is not cut: it gets ``CONNECTION_AGE_GRACE_MS`` to finish."""
    if seconds <= 0:
        return []
    return [("grpc.max_connection_age_ms", int(seconds * 1000)),
            ("grpc.max_connection_age_grace_ms", CONNECTION_AGE_GRACE_MS)]


CONNECTION_AGE_GRACE_MS = 30 * 60 * 1000


class Loadable(Protocol):
    """A servicer whose model is loaded after the server is listening."""

    def load(self) -> None: ...


class ReadyGate:
    """Refuses calls with UNAVAILABLE until the model is loaded, and again while draining."""

    def __init__(self, service: str) -> None:
        self._service = service
        self._ready = threading.Event()
        self._draining = threading.Event()

    def open(self) -> None:
        self._ready.set()

    def drain(self) -> None:
        self._draining.set()

    def check(self) -> None:
        if self._draining.is_set():
            raise Unavailable(f"{self._service} is shutting down; retry on another replica")
        if not self._ready.is_set():
            raise Unavailable(f"{self._service} is still loading its model; retry in a few seconds")


class GrpcServer:
    """One gRPC server with health and reflection; ``start`` binds and returns the real port."""

    def __init__(self, config: ServerConfig, service_name: str,
                 add_servicer: Callable[[grpc.Server], None],
                 interceptors: "list[grpc.ServerInterceptor] | None" = None) -> None:
        self.config = config
        self.service_name = service_name
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=config.max_workers),
                                   options=message_options(config.max_message_bytes)
                                   + connection_age_options(config.max_connection_age_seconds),
                                   interceptors=interceptors or None)
        add_servicer(self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        reflection.enable_server_reflection(
            (service_name, health.SERVICE_NAME, reflection.SERVICE_NAME), self._server)
        self.set_serving(False)
        self.port = 0

    def start(self) -> int:
        self.port = self._server.add_insecure_port(self.config.address)
        if self.port == 0:
            raise RuntimeError(f"cannot listen on {self.config.address}: is the port already in use?")
        self._server.start()
        return self.port

    def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", self.service_name):
            self._health.set(name, status)

    def stop(self, grace: float | None = None) -> None:
        self.set_serving(False)
        self._server.stop(self.config.grace_seconds if grace is None else grace).wait()

    def wait(self) -> None:
        self._server.wait_for_termination()


def serve(config: ServerConfig, service: str, service_name: str, servicer: Loadable, gate: ReadyGate,
          add_servicer: Callable[[grpc.Server], None],
          interceptors: "list[grpc.ServerInterceptor] | None" = None) -> None:
    """Run a service until SIGTERM/SIGINT: listen, load the model, report SERVING, drain, stop."""
    log = setup_logging(service, config.log_level)
    log.info("event=config " + describe(config))
    server = GrpcServer(config, service_name, add_servicer, interceptors)
    port = server.start()
    log.info(kv("listening", address=f"{config.host}:{port}", health="NOT_SERVING"))
    metrics = metrics_of(servicer, service)
    metrics.serve_http(config.host, config.metrics_port)   # -1 = off

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    started = time.monotonic()
    try:
        servicer.load()
    except Exception as exc:  # noqa: BLE001 - report the reason in one line and exit non-zero
        log.error(kv("load_failed", reason=str(exc)))
        server.stop(0)
        raise SystemExit(f"{service}: {exc}") from None
    gate.open()
    server.set_serving(True)
    metrics.model_loaded(time.monotonic() - started)
    log.info(kv("serving", address=f"{config.host}:{port}", load_seconds=round(time.monotonic() - started, 2)))

    while not stop.wait(0.5):
        pass
    log.info(kv("draining", grace_seconds=config.grace_seconds))
    gate.drain()
    server.stop()
    metrics.stop_http()
    log.info(kv("stopped"))
