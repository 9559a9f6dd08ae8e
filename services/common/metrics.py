"""Prometheus metrics every service has, and the HTTP endpoint that serves them at ``/metrics``.

Why a registry per server and not prometheus_client's global one: tests run several servers in one
process, and each server must report only its own numbers. A servicer owns its metrics as
``self.metrics`` (a :class:`ServiceMetrics` or a subclass that adds the stage's own metrics);
``serve()`` serves that registry on ``--metrics-port`` (-1 = off, 0 = any free port) and records
the model load, and ``errors.grpc_errors`` counts every call by method and status code.

Conventions (DESIGN section 6): ``t2v_`` prefix, seconds and bytes as base units, histograms for
durations, labels with bounded values only (stage, method, status code, outcome, priority).
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import sys
import threading
import time
from importlib import metadata
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any, Callable, Sequence
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (CollectorRegistry, Counter, Gauge, GCCollector, Histogram, PlatformCollector,
                               ProcessCollector, make_wsgi_app)

from services.common.logs import kv

log = logging.getLogger("metrics")

# From a 5 ms Encode to a 10-minute Denoise of a long video on a slow card.
DURATION_BUCKETS: Sequence[float] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                                     120.0, 300.0, 600.0)
LOAD_BUCKETS: Sequence[float] = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


# A connection to /metrics must send its request and take its answer within this many seconds of being
# accepted (Prometheus' default scrape timeout; a scrape takes milliseconds). Read when a connection comes.
METRICS_CONNECTION_SECONDS = 10.0


class _DeadlineSocket(socket.socket):
    """An accepted connection whose every read and write must end by one deadline, however the bytes trickle.

    Why a deadline and not just a socket timeout: a timeout bounds each read, so a client sending a byte a
    second would hold its thread forever."""

    deadline = 0.0

    @classmethod
    def adopt(cls, sock: socket.socket, seconds: float) -> "_DeadlineSocket":
        conn = cls(sock.family, sock.type, sock.proto, fileno=sock.detach())
        conn.deadline = time.monotonic() + seconds
        return conn

    def _time_left(self) -> None:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("the metrics client took too long")
        self.settimeout(left)

    def recv(self, *args: Any) -> bytes:
        self._time_left()
        return super().recv(*args)

    def recv_into(self, *args: Any) -> int:
        self._time_left()
        return super().recv_into(*args)

    def send(self, *args: Any) -> int:
        self._time_left()
        return super().send(*args)

    def sendall(self, *args: Any) -> None:
        self._time_left()
        super().sendall(*args)


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the stdlib's name
        """One line per scrape would drown the log."""


class _MetricsServer(ThreadingMixIn, WSGIServer):
    """prometheus_client's server (a thread per connection, one request each), with a deadline on each
    connection (``METRICS_CONNECTION_SECONDS``): an idle or trickling client is closed, freeing its thread."""

    daemon_threads = True
    request_queue_size = 128          # the listen backlog (socketserver's 5 made a burst of connections wait
                                      # seconds for their SYN to be sent again)

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = self.socket.accept()
        return _DeadlineSocket.adopt(sock, METRICS_CONNECTION_SECONDS), address

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):    # too slow (TimeoutError) or gone: nothing to report
            return
        super().handle_error(request, client_address)


class MetricsHttp:
    """``/metrics`` for one registry on its own HTTP port, in a daemon thread; ``stop`` frees the port."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
        server_class = type("_MetricsServerOf", (_MetricsServer,), {"address_family": family})
        self._server = make_server(host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.port: int = self._server.server_port

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


ENV_REVISION = "T2V_BUILD_REVISION"        # the image's git revision (deploy/docker/Dockerfile sets it)
_REPO = Path(__file__).resolve().parents[2]


def _package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "none"


def git_revision(root: Path = _REPO) -> str:
    """The commit (12 hex digits) of the git checkout at ``root``, read from its files (no git binary, no
    subprocess); "unknown" where there is none, e.g. in the image, which has no .git (it sets
    ``T2V_BUILD_REVISION`` instead)."""
    try:
        git = root / ".git"
        if git.is_file():                         # a worktree or submodule: "gitdir: PATH"
            git = (root / git.read_text().partition(":")[2].strip()).resolve()
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]                      # a detached HEAD
        ref = head[len("ref: "):]
        common = git
        if (git / "commondir").is_file():         # a worktree keeps its branches in the main .git
            common = (git / (git / "commondir").read_text().strip()).resolve()
        for folder in (git, common):
            if (folder / ref).is_file():
                return (folder / ref).read_text().strip()[:12]
        for line in (common / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split()[0][:12]
    except (OSError, UnicodeDecodeError):
        pass
    return "unknown"


@functools.lru_cache(maxsize=1)
def build_info() -> dict[str, str]:
    """What ``t2v_build_info`` says: this package's version, its git revision, torch's and grpcio's versions
    (from the installed packages' metadata: nothing is imported). Read once per process."""
    return {"version": _package_version("t2v-mesh"),
            "revision": os.environ.get(ENV_REVISION, "").strip() or git_revision(),
            "torch": _package_version("torch"), "grpc": _package_version("grpcio")}


class ServiceMetrics:
    """The metrics every service has: build, model load state and time, gRPC calls by method and code.

    ``stage`` is the service's name (text_encoder, denoiser, decoder, gateway); it labels the model
    metrics, so one dashboard can show every stage's load state side by side.
    """

    def __init__(self, stage: str, registry: CollectorRegistry | None = None) -> None:
        self.stage = stage
        self.registry = registry if registry is not None else new_registry()
        r = self.registry
        self._build = Gauge("t2v_build_info", "Always 1; the labels say what runs: the t2v-mesh version, its git "
                            "revision (unknown outside a checkout, unless the image sets it), the torch and grpcio "
                            "versions", list(build_info()), registry=r)
        self._build.labels(**build_info()).set(1)
        self._loaded = Gauge("t2v_model_loaded", "1 once the service has loaded its model (and reports SERVING), "
                             "else 0", ["stage"], registry=r)
        self._load_seconds = Histogram("t2v_model_load_duration_seconds", "Time from start of the model load "
                                       "to SERVING, in seconds (one observation per process)", ["stage"],
                                       buckets=LOAD_BUCKETS, registry=r)
        self._rpcs = Counter("t2v_grpc_requests", "gRPC calls handled, by method and final status code",
                             ["method", "code"], registry=r)
        self._rpc_seconds = Histogram("t2v_grpc_request_duration_seconds", "Time to handle a gRPC call (a "
                                      "streaming call: until its last message), in seconds", ["method"],
                                      buckets=DURATION_BUCKETS, registry=r)
        self._rpcs_in_progress = Gauge("t2v_grpc_requests_in_progress", "gRPC calls being handled now, by method",
                                       ["method"], registry=r)
        self._streams_open = Gauge("t2v_grpc_streams_open", "Streaming gRPC calls open now (health checks aside), at "
                                   "most --max-streams", registry=r)
        self._streams_refused = Counter("t2v_grpc_streams_refused", "Streaming gRPC calls refused at once with "
                                        "RESOURCE_EXHAUSTED because --max-streams were open, by method",
                                        ["method"], registry=r)
        self._loaded.labels(stage).set(0)
        self._http: MetricsHttp | None = None
        self._lock = threading.Lock()

    # --- model -------------------------------------------------------------------------------
    def model_loaded(self, seconds: float) -> None:
        """The model is loaded and the service is SERVING; ``seconds`` is how long loading took."""
        self._load_seconds.labels(self.stage).observe(seconds)
        self._loaded.labels(self.stage).set(1)

    def model_unloaded(self) -> None:
        """The service stopped serving (draining)."""
        self._loaded.labels(self.stage).set(0)

    # --- gRPC calls (called by errors.grpc_errors) -----------------------------------------------
    def rpc_started(self, method: str) -> None:
        self._rpcs_in_progress.labels(method).inc()

    def rpc_finished(self, method: str, code: str, seconds: float) -> None:
        """``code`` is the gRPC status name: OK, INVALID_ARGUMENT, CANCELLED, ..."""
        self._rpcs_in_progress.labels(method).dec()
        self._rpcs.labels(method, code).inc()
        self._rpc_seconds.labels(method).observe(seconds)

    # --- streaming calls (called by server.StreamLimit) --------------------------------------------
    def watch_streams(self, count: Callable[[], int]) -> None:
        """Read the number of open streaming calls from ``count()`` at each scrape."""
        self._streams_open.set_function(count)

    def stream_refused(self, method: str) -> None:
        """A streaming call refused because ``--max-streams`` were open (it never reached the servicer)."""
        self._streams_refused.labels(method).inc()

    # --- the HTTP endpoint -------------------------------------------------------------------
    def serve_http(self, host: str, port: int) -> int | None:
        """Serve ``/metrics`` on ``host:port`` (port 0 = any free port, -1 = don't); return the port."""
        if port < 0:
            return None
        with self._lock:
            if self._http is None:
                try:
                    self._http = MetricsHttp(self.registry, host, port)
                except (OSError, OverflowError) as exc:
                    raise RuntimeError(f"cannot serve metrics on {host}:{port} ({exc}); is the port already "
                                       "in use? pass another --metrics-port, 0 for any free port or -1 for none"
                                       ) from None
                log.info(kv("metrics_listening", url=f"http://{host}:{self._http.port}/metrics"))
            return self._http.port

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    def stop_http(self) -> None:
        with self._lock:
            if self._http is not None:
                self._http.stop()
                self._http = None


def new_registry() -> CollectorRegistry:
    """A registry of its own, with the standard process_* (CPU, memory, open files) and python_* metrics."""
    registry = CollectorRegistry()
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_of(servicer: Any, stage: str) -> ServiceMetrics:
    """The servicer's ``metrics``; a servicer that has none gets the common ones (so every service
    serves ``/metrics`` and counts its calls, even before it defines metrics of its own)."""
    metrics = getattr(servicer, "metrics", None)
    if isinstance(metrics, ServiceMetrics):
        return metrics
    fresh = ServiceMetrics(stage)
    if metrics is None:
        servicer.metrics = fresh
    return fresh
