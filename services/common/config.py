"""Service configuration: a frozen dataclass per service, filled from CLI flags, then ``T2V_*``
environment variables, then the defaults written in the dataclass.

Why one mechanism: every service is configured the same way on a laptop (flags) and on Kubernetes
(env from a ConfigMap), and ``--help`` always lists every setting with its variable and default.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = str(REPO_ROOT / "models" / "t2v-world")
ENV_PREFIX = "T2V_"

C = TypeVar("C")


def setting(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with the help text that ``--help`` shows."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServerConfig:
    """Settings every gRPC server has."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0 in a container)")
    port: int = setting(0, "port to listen on (0 = any free port)")
    max_message_mb: int = setting(64, "largest gRPC message sent or received, in MiB")
    max_workers: int = setting(64, "gRPC handler threads (concurrent calls)")
    max_streams: int = setting(0, "most streaming calls open at once (Generate, GetVideo, Denoise, ...); more are "
                                  "refused at once with RESOURCE_EXHAUSTED, so health checks and short calls always "
                                  "find a thread (0 = three quarters of --max-workers)")
    grace_seconds: float = setting(10.0, "on SIGTERM, how long in-flight calls may take to finish")
    max_connection_age_seconds: float = setting(
        0.0, "close client connections after this long (0 = never) so clients re-resolve DNS and spread "
             "over new replicas; in-flight calls get 30 minutes to finish")
    log_level: str = setting("info", "debug, info, warning or error")
    metrics_port: int = setting(-1, "HTTP port that serves Prometheus /metrics on --host (-1 = off, "
                                    "0 = any free port)")
    tls_cert: str = setting("", "PEM certificate (chain) of this server; with --tls-key, its ports speak TLS "
                                "only (the gateway's HTTP API too)")
    tls_key: str = setting("", "PEM private key of --tls-cert")
    tls_client_ca: str = setting("", "PEM CA bundle; set, every client must present a certificate it signed "
                                     "(mutual TLS; needs --tls-cert)")
    health_port: int = setting(-1, "a second, plaintext port on --host that serves only grpc.health.v1, for "
                                   "probes that cannot do (mutual) TLS (-1 = off, 0 = any free port)")
    otlp_endpoint: str = setting("", "OTLP/HTTP receiver for traces, e.g. http://otel-collector:4318 (spans go to "
                                     "its /v1/traces); unset = OTEL_EXPORTER_OTLP_TRACES_ENDPOINT or "
                                     "OTEL_EXPORTER_OTLP_ENDPOINT if set, else no traces (and no tracing cost)")

    @property
    def stream_limit(self) -> int:
        """``max_streams``, or its default (three quarters of ``max_workers``); ValueError naming the flag when
        it would leave no handler thread for health checks and short calls."""
        if self.max_workers < 2:
            raise ValueError(f"--max-workers is {self.max_workers}; it must be at least 2 (one thread for streams, "
                             "one for health checks and short calls)")
        if self.max_streams < 0 or self.max_streams >= self.max_workers:
            raise ValueError(f"--max-streams is {self.max_streams}; it must be 0 (three quarters of --max-workers) or "
                             f"between 1 and {self.max_workers - 1} (below --max-workers, {self.max_workers}, so "
                             "streams never take every thread)")
        return self.max_streams or self.max_workers * 3 // 4

    @property
    def max_message_bytes(self) -> int:
        return self.max_message_mb * 1024 * 1024

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class ModelConfig(ServerConfig):
    """Settings of a stage that loads part of the model folder."""

    model: str = setting(DEFAULT_MODEL, "diffusers model folder (text-to-video-ms-1.7b layout)")
    device: str = setting("auto", "torch device: cpu, cuda, cuda:1 ... (auto = cuda if available)")
    dtype: str = setting("auto", "float32, float16 or bfloat16 (auto = float16 on GPU, float32 on CPU)")
    trusted_network: bool = setting(False, "listen on a non-loopback --host without mutual TLS: only where the "
                                           "network itself keeps everyone but the gateway out (a NetworkPolicy)")


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def _converter(kind: Any) -> Any:
    return _parse_bool if kind is bool else kind


def parse_config(cls: type[C], argv: Sequence[str] | None, prog: str, description: str) -> C:
    """Build ``cls`` from flags, then env, then defaults. Exits with a usage message on bad input."""
    hints = typing.get_type_hints(cls)
    parser = argparse.ArgumentParser(prog=prog, description=description)
    for f in dataclasses.fields(cls):
        env = ENV_PREFIX + f.name.upper()
        parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_converter(hints[f.name]),
                            default=None, metavar=f.name.upper(),
                            help=f"{f.metadata.get('help', '')} [env {env}; default {f.default}]".replace("%", "%%"))
    namespace = parser.parse_args(argv)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        value = getattr(namespace, f.name)
        env = ENV_PREFIX + f.name.upper()
        if value is None and env in os.environ:
            try:
                value = _converter(hints[f.name])(os.environ[env])
            except ValueError as exc:
                parser.error(f"environment variable {env}={os.environ[env]!r} is not valid: {exc}")
        if value is not None:
            values[f.name] = value
    return cls(**values)


def describe(config: Any) -> str:
    """One line with every setting, printed once at start (values quoted as in the logs)."""
    from services.common.logs import kv

    return kv("config", **dataclasses.asdict(config)).removeprefix("event=config ")
