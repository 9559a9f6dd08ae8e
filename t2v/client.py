"""``t2v generate``: call the gateway, show the denoising steps as a progress bar, write the MP4."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, TextIO

import grpc

from services.common.tls import ClientTls, TlsConfigError, channel as tls_channel, load_client_tls
from t2v.v1 import gateway_pb2, gateway_pb2_grpc, generation_pb2

_STAGE_LABELS = {gateway_pb2.STAGE_TEXT_ENCODER: "encoding the prompt", gateway_pb2.STAGE_DENOISER: "denoising",
                 gateway_pb2.STAGE_DECODER: "decoding frames and writing the MP4"}
MAX_MESSAGE_BYTES = 256 * 1024 * 1024


class GenerateError(RuntimeError):
    """A failed generation, with a sentence for the user."""


DEFAULT_GATEWAY = "127.0.0.1:50050"      # `t2v up`'s gateway with the default ports


def default_gateway() -> str:
    """The gateway ``t2v generate`` and ``t2v jobs`` call when not told: $T2V_GATEWAY, else DEFAULT_GATEWAY."""
    return os.environ.get("T2V_GATEWAY", "").strip() or DEFAULT_GATEWAY


def add_gateway_arg(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--gateway HOST:PORT, its default ($T2V_GATEWAY or 127.0.0.1:50050) shown in --help. ``suppress``: leave
    the value unset when the flag is not given (an action's copy, so that it does not undo the one before it)."""
    current = default_gateway()
    where = ("from $T2V_GATEWAY" if os.environ.get("T2V_GATEWAY", "").strip()
             else "`t2v up`'s; set $T2V_GATEWAY for another")
    parser.add_argument("--gateway", metavar="HOST:PORT", default=argparse.SUPPRESS if suppress else current,
                        help=f"the gateway's gRPC address (default: {current}, {where})")


def duration(seconds: float) -> str:
    """A duration a person reads at a glance: 0.4 s, 42 s, 3 min 05 s, 2 h 05 min, 3 d 04 h."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60:02d} min"
    return f"{whole // 86400} d {whole % 86400 // 3600:02d} h"


@dataclass
class ProgressBar:
    """A one-line bar on a terminal; one line per stage elsewhere (logs, CI). Each step line shows the
    time since the request, the pace of the denoising steps and an estimate of the time left (from the
    pace since the first step seen: the time before it is queueing and prompt encoding)."""

    stream: TextIO
    width: int = 30
    clock: Callable[[], float] = time.monotonic
    started: float = field(default=-1.0)
    _first: tuple[int, float] | None = field(default=None, repr=False)   # (step, time) of the first step seen

    def __post_init__(self) -> None:
        if self.started < 0:
            self.started = self.clock()

    def stage(self, label: str) -> None:
        self.stream.write(f"{label}...\n")
        self.stream.flush()

    def timing(self, step: int, total: int) -> str:
        """"elapsed 3.1 s, 4.2 steps/s, about 9 s left" (no pace before the second step; no estimate at the end)."""
        now = self.clock()
        if self._first is None or step < self._first[0]:      # the first step, or a resumed job counting again
            self._first = (step, now)
        parts = [f"elapsed {duration(now - self.started)}"]
        done, spent = step - self._first[0], now - self._first[1]
        if done > 0 and spent > 0:
            rate = done / spent
            parts.append(f"{rate:.1f} steps/s" if rate >= 1 else f"{1 / rate:.1f} s/step")
            if step < total:
                parts.append(f"about {duration(max(1.0, (total - step) / rate))} left")
        return ", ".join(parts)

    def step(self, step: int, total: int) -> None:
        filled = self.width * step // max(total, 1)
        line = f"  [{'#' * filled}{'.' * (self.width - filled)}] step {step}/{total}  {self.timing(step, total)}"
        if self.stream.isatty():
            self.stream.write("\r" + line + "\033[K" + ("\n" if step == total else ""))
        elif step == total or step == 1 or step % 10 == 0:
            self.stream.write(line + "\n")
        self.stream.flush()


def gateway_channel(gateway: str, tls: ClientTls | None = None) -> grpc.Channel:
    """A channel to the gateway that takes whole videos (the 4 MiB default would not); TLS with ``tls``."""
    return tls_channel(gateway, tls, [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                                      ("grpc.max_send_message_length", MAX_MESSAGE_BYTES)])


def add_tls_args(parser: argparse.ArgumentParser, suppress: bool = False) -> None:
    """--tls, --ca, --client-cert, --client-key: how ``t2v generate`` and ``t2v jobs`` reach a TLS gateway.
    ``suppress``: unset when not given (as in ``add_gateway_arg``)."""
    unset = {"default": argparse.SUPPRESS} if suppress else {}
    g = parser.add_argument_group("TLS (a gateway started with --tls-cert)")
    g.add_argument("--tls", action="store_true", help="use TLS, trusting the system's CAs [env T2V_TLS=1]", **unset)
    g.add_argument("--ca", help="PEM CA that signed the gateway's certificate; implies --tls [env T2V_CA]", **unset)
    g.add_argument("--client-cert", help="PEM certificate for a gateway that requires one (--tls-client-ca) "
                                         "[env T2V_CLIENT_CERT]", **unset)
    g.add_argument("--client-key", help="PEM private key of --client-cert [env T2V_CLIENT_KEY]", **unset)


def tls_from_args(args: argparse.Namespace) -> ClientTls | None:
    """The TLS settings of ``add_tls_args`` (flags, then env); None = plaintext. Raises GenerateError."""
    def pick(name: str) -> str:
        return getattr(args, name, None) or os.environ.get(f"T2V_{name.upper()}", "")
    enabled = bool(getattr(args, "tls", False)) or os.environ.get("T2V_TLS", "") in ("1", "true", "yes", "on")
    try:
        return load_client_tls(pick("ca"), pick("client_cert"), pick("client_key"), enabled,
                               names=("ca", "client_cert", "client_key"))
    except TlsConfigError as error:
        raise GenerateError(str(error)) from None


def auth_metadata(api_key: str | None) -> list[tuple[str, str]] | None:
    return [("authorization", f"Bearer {api_key}")] if api_key else None


def explain(gateway: str, error: grpc.RpcError) -> str:
    """One sentence for a failed call: the gateway's own message, or that it cannot be reached."""
    code, details = error.code(), error.details() or ""
    if code == grpc.StatusCode.UNAVAILABLE and "stage" not in details:
        if any(word in details.lower() for word in ("ssl", "tls", "handshake", "certificate")):
            return (f"cannot reach the gateway at {gateway}: the TLS handshake failed ({details}); does --ca name "
                    "the CA that signed the gateway's certificate, and does the gateway use TLS?")
        return (f"cannot reach the gateway at {gateway} ({details}); is `t2v up` running? (a gateway with TLS "
                "needs --ca or --tls)")
    return f"{code.name}: {details}"


def generate(gateway: str, params: generation_pb2.GenerationParams, output: Path, timeout: float | None = None,
             progress: TextIO | None = sys.stderr, api_key: str | None = None,
             priority: int = gateway_pb2.PRIORITY_UNSPECIFIED, tls: ClientTls | None = None
             ) -> gateway_pb2.VideoResult:
    """Run one generation through the gateway and write the video to ``output``."""
    metadata = auth_metadata(api_key)
    bar = ProgressBar(progress) if progress is not None else None
    with gateway_channel(gateway, tls) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)
        result = None
        try:
            for event in stub.Generate(gateway_pb2.GenerateRequest(params=params, priority=priority),
                                       timeout=timeout, metadata=metadata):
                for warning in event.warnings:
                    if bar:
                        bar.stream.write(f"warning: {warning}\n")
                kind = event.WhichOneof("event")
                if kind == "queue" and bar:
                    bar.stage(f"waiting in the queue: {event.queue.position} of {event.queue.queue_length}")
                elif kind == "stage" and bar:
                    bar.stage(_STAGE_LABELS.get(event.stage.stage, "working"))
                elif kind == "progress" and bar:
                    bar.step(event.progress.step, event.progress.total_steps)
                elif kind == "result":
                    result = event.result
        except grpc.RpcError as error:
            raise GenerateError(explain(gateway, error)) from None
    if result is None:
        raise GenerateError("the gateway ended the stream without a video")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_bytes(result.video)
    return result
